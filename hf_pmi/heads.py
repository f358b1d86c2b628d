"""Classifier heads on continual features: a part of their own, chosen by name (`HEADS`, ``--head``).

A head turns the vision tower's pooled features (the class token after the post-layernorm, before the
projection into the joint image-text space) into class scores. It keeps **statistics only** (class sums
and counts, a Gram matrix, a target product; never an image or the feature of a single sample), adds
a task's statistics with `update` when the task is learned, and is exact under class-incremental order:
the statistics after tasks ``0..t`` equal those of one fit on their union when the features do not move.

| name | scores | statistics (per checkpoint) |
|---|---|---|
| ``text`` | the CLIP text head (class-name embeddings); no `ContinualHead` at all | none |
| ``ncm`` | cosine to each class mean (nearest class mean, SimpleCIL) | class sums (C, D), counts (C,) |
| ``ranpac`` | ridge regression on a fixed random ReLU projection of the features (RanPAC) | projection (D, M), Gram (M, M), targets (M, C) |

A head is saved in a checkpoint's ``head/`` folder (``head.json`` + ``head.safetensors``; float64
statistics, so a reload is bit-exact) and used by `ContinualCLIP` in eval mode
(``ContinualCLIPOutput.head_logits``, which ``prediction_logits`` returns).

Example:
    >>> import torch
    >>> head = build_head("ncm", feature_dim=4)
    >>> head.update(torch.eye(4)[:2], torch.tensor([0, 1]))
    >>> head.num_classes, head(torch.tensor([[0.9, 0.1, 0.0, 0.0]])).argmax(-1).item()
    (2, 0)
"""

from __future__ import annotations

import inspect
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .integrity import load_safetensors, read_json, save_safetensors, write_json

HEAD_FOLDER = "head"
CONFIG_NAME = "head.json"
WEIGHTS_NAME = "head.safetensors"
TEXT = "text"  # the CLIP text head: the model's own classifier, no statistics
HEADS: dict[str, type["ContinualHead"]] = {}
# RanPAC's grid of ridge strengths, 10^-8 .. 10^13 (its `optimise_ridge_parameter`)
RIDGE_GRID = [10.0**k for k in range(-8, 14)]
HOLDOUT = 0.2  # RanPAC: the ridge is chosen on a 20 % hold-out of the current task's data
# How the ranpac head picks its ridge at each update: on the hold-out of every class seen so far (from kept
# statistics) or, as RanPAC does, on the current task's hold-out alone
RIDGE_CHOICES = ("seen", "task")


def register_head(name: str):
    """Class decorator adding a `ContinualHead` subclass to `HEADS` under `name`."""

    def wrap(cls):
        cls.name = name
        HEADS[name] = cls
        return cls

    return wrap


def head_names() -> list[str]:
    """Every head ``--head`` accepts: ``text`` and the registered statistic heads."""
    return [TEXT, *sorted(HEADS)]


def check_head_name(name: str) -> None:
    if name != TEXT and name not in HEADS:
        raise ValueError(f"Unknown head {name!r}. Available: {head_names()} (`hf_pmi.heads`).")


class ContinualHead(nn.Module):
    """Base of the statistic heads (module docstring). Subclasses define ``update``, ``forward`` and
    ``settings``; every statistic is a registered buffer, so ``state_dict`` is the whole state."""

    name = "base"

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def settings(self) -> dict:
        return {}

    def _grow(self, labels: torch.Tensor) -> None:
        """Make room for classes up to ``labels.max()``; a class id never seen keeps a zero count."""
        n = int(labels.max()) + 1 if len(labels) else 0
        if n > self.num_classes:
            self._resize(n)

    def _resize(self, n: int) -> None:
        self.counts = torch.cat([self.counts, self.counts.new_zeros(n - self.num_classes)])

    def _check_features(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"The {self.name} head reads ({self.feature_dim},)-dim features, got shape "
                             f"{tuple(features.shape)}: build it with the model's feature size (`build_head(..., "
                             f"feature_dim=model.feature_dim)`).")
        if labels is not None and len(labels) != len(features):
            raise ValueError(f"{len(features)} features but {len(labels)} labels.")

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    def shift_classes(self, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> None:
        """Drift compensation: `before` / `after` are features of the same samples (e.g. a class's replay
        samples) through the model the statistics were taken with and through the current one; each class in
        `labels` is moved by its samples' mean displacement (a translation: its spread is kept)."""
        raise NotImplementedError

    @staticmethod
    def _class_means(x: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        ids = sorted(set(labels.tolist()))
        return ids, torch.stack([x[labels == c].mean(0) for c in ids])

    def check_ready(self, num_classes: int) -> None:
        """Refuse to score a model whose classes the head does not all know (statistics of a class are
        collected when its task is learned)."""
        missing = [c for c in range(num_classes) if c >= self.num_classes or self.counts[c] == 0]
        if missing:
            raise ValueError(
                f"The {self.name} head has no statistics for classes {missing[:10]}{'...' if len(missing) > 10 else ''} "
                f"of the model's {num_classes}: a head learns a class from its images when its task is trained "
                f"(`ContinualTrainer`), or with `model.head.update(model.pooled_features(images), labels)`. Classes "
                f"learned from their names only need head='text'."
            )

    # ----- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.state_dict().items()}
        save_safetensors(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {"head": self.name, "feature_dim": self.feature_dim, "settings": self.settings()}
        write_json(os.path.join(folder, CONFIG_NAME), meta, seal=True)

    @classmethod
    def from_pretrained(cls, folder: str) -> "ContinualHead":
        meta = read_json(os.path.join(folder, CONFIG_NAME))
        check_head_name(meta["head"])
        settings = dict(meta["settings"])
        if meta["head"] == "ranpac":
            settings.setdefault("ridge_choice", "task")  # heads saved by hf_pmi 0.3 chose their ridge per task
        head = HEADS[meta["head"]](meta["feature_dim"], **settings)
        tensors = load_safetensors(os.path.join(folder, WEIGHTS_NAME))
        head._resize(len(tensors["counts"]))
        head.load_state_dict(tensors)
        return head


@register_head("ncm")
class NCMHead(ContinualHead):
    """Nearest class mean: logits are ``scale * cos(feature, class mean)`` (SimpleCIL's prototype classifier)."""

    scale = 16.0  # a cosine temperature: only argmax and the ordering of scores matter for the metrics

    def __init__(self, feature_dim: int):
        super().__init__(feature_dim)
        self.register_buffer("sums", torch.zeros(0, feature_dim, dtype=torch.float64))

    def _resize(self, n: int) -> None:
        self.sums = torch.cat([self.sums, self.sums.new_zeros(n - self.num_classes, self.feature_dim)])
        super()._resize(n)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self._check_features(features, labels)
        self._grow(labels)
        f, y = features.detach().to(self.sums), labels.to(self.sums.device).long()
        self.sums.index_add_(0, y, f)
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=self.counts.dtype))

    def shift_classes(self, before, after, labels) -> None:
        ids, delta = self._class_means((after - before).to(self.sums), labels.to(self.sums.device))
        ids = torch.as_tensor(ids, device=self.sums.device)
        self.sums[ids] += self.counts[ids, None] * delta

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        means = self.sums / self.counts.clamp(min=1)[:, None]
        return self.scale * F.normalize(features.float(), dim=-1) @ F.normalize(means.float(), dim=-1).t()


@register_head("ranpac")
class RanPACHead(ContinualHead):
    """Ridge regression on a fixed random projection: ``h = relu(x @ W)`` with ``W ~ N(0, 1)`` of shape
    (D, M); ``G = sum h h^T``, ``Q = sum h y^T`` (one-hot ``y``) accumulate task by task; logits are
    ``h @ (G + ridge I)^-1 Q``. The ridge is re-chosen at every update from 10^-8 .. 10^13 by the mean
    squared error on a 20 % hold-out:

    - ``ridge_choice="seen"`` (default): the hold-out of every update so far. Its statistics (``G_val``,
      ``Q_val``, counts) are kept beside ``G`` and ``Q``, and the error of the ridge fitted on the rest,
      ``tr(W^T G_val W) - 2 tr(W^T Q_val) + n_val``, needs no sample: the choice sees every class seen, at
      twice the size on disk.
    - ``ridge_choice="task"``: RanPAC's, on the current update's data alone (a fit on its 80 %). With small
      tasks (two classes) that choice is noisy: on the digits demo's final features it lands on 10^2..10^4
      and costs up to 0.03 A_last against the seen hold-out's 10^3 (`benchmarks/heads.py`, docs "Heads").

    Args:
        projection_dim: M. RanPAC uses 10,000; the statistics then take 800 MB (float64 Gram). hf_pmi's
            default, 2,000 (33 MB), is 0.003 / 0.006 / 0.024 below M = 4,000 (130 MB) on digits / shapes /
            MNIST with a frozen backbone (docs/benchmarks.md, "Heads"): raise it where features are weak
            and checkpoints may be large.
        seed: seed of ``W`` and of the hold-out splits (``W`` is saved too: a reload does not depend on the
            generator).
        ridge_choice: ``"seen"`` or ``"task"`` (above).
    """

    def __init__(self, feature_dim: int, projection_dim: int = 2000, seed: int = 0, ridge: float | None = None,
                 ridge_choice: str = "seen"):
        super().__init__(feature_dim)
        self.projection_dim, self.seed, self.ridge_choice = int(projection_dim), int(seed), ridge_choice
        if self.projection_dim < 1:
            raise ValueError(f"head projection_dim must be >= 1, got {projection_dim}.")
        if ridge_choice not in RIDGE_CHOICES:
            raise ValueError(f"ridge_choice must be one of {RIDGE_CHOICES} ('seen': on the hold-out of every class "
                             f"seen; 'task': RanPAC's, on the current task's), got {ridge_choice!r}.")
        w = torch.randn(feature_dim, self.projection_dim, generator=torch.Generator().manual_seed(self.seed))
        self.register_buffer("projection", w)
        self.register_buffer("gram", torch.zeros(self.projection_dim, self.projection_dim, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(self.projection_dim, 0, dtype=torch.float64))
        self.register_buffer("ridge", torch.tensor(1.0 if ridge is None else float(ridge), dtype=torch.float64))
        if ridge_choice == "seen":  # the hold-out's share of G and Q, and its samples per class
            self.register_buffer("val_gram", torch.zeros_like(self.gram))
            self.register_buffer("val_targets", torch.zeros_like(self.targets))
            self.register_buffer("val_counts", torch.zeros(0, dtype=torch.float64))
        self._weight: torch.Tensor | None = None

    def settings(self) -> dict:
        return {"projection_dim": self.projection_dim, "seed": self.seed, "ridge_choice": self.ridge_choice}

    def _resize(self, n: int) -> None:
        grow = n - self.num_classes
        self.targets = torch.cat([self.targets, self.targets.new_zeros(self.projection_dim, grow)], 1)
        if self.ridge_choice == "seen":
            self.val_targets = torch.cat([self.val_targets, self.val_targets.new_zeros(self.projection_dim, grow)], 1)
            self.val_counts = torch.cat([self.val_counts, self.val_counts.new_zeros(grow)])
        super()._resize(n)

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight = None
        super()._load_from_state_dict(*args, **kwargs)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(features.to(self.projection) @ self.projection)

    def _one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels.long(), self.num_classes).to(self.gram)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self._check_features(features, labels)
        self._grow(labels)
        h = self.project(features.detach()).to(self.gram)
        y = self._one_hot(labels.to(h.device))
        split = self._holdout(len(h))
        if self.ridge_choice == "task" and split is not None:
            self.ridge.fill_(self._choose_ridge_task(h, y, *split))
        self.gram += h.t() @ h
        self.targets += h.t() @ y
        self.counts += y.sum(0)
        if self.ridge_choice == "seen" and split is not None:
            h_val, y_val = h[split[0]], y[split[0]]
            self.val_gram += h_val.t() @ h_val
            self.val_targets += h_val.t() @ y_val
            self.val_counts += y_val.sum(0)
            self.ridge.fill_(self._choose_ridge_seen())
        self._weight = None

    def _holdout(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(validation, fit) indices: a fixed 20 / 80 split (the same data choose the same ridge); None when
        either part would be empty."""
        n_val = int(n * HOLDOUT)
        if n_val < 1 or n - n_val < 1:
            return None
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[:n_val], perm[n_val:]

    @staticmethod
    def _best(errors: list[float]) -> float:
        return RIDGE_GRID[min(range(len(errors)), key=lambda i: errors[i] if math.isfinite(errors[i]) else math.inf)]

    def _choose_ridge_seen(self) -> float:
        """The ridge of least squared error on the hold-out of every update so far, fitted on the rest: with
        ``G_fit = V diag(s) V^T``, ``W(r) = V diag(1 / (s + r)) V^T Q_fit``, one eigendecomposition for the grid."""
        evals, evecs = torch.linalg.eigh(self.gram - self.val_gram)
        right = evecs.t() @ (self.targets - self.val_targets)  # V^T Q_fit
        val_gram = evecs.t() @ self.val_gram @ evecs  # the hold-out's Gram in the same basis
        val_targets = evecs.t() @ self.val_targets
        errors = []
        for r in RIDGE_GRID:
            w = right / (evals + r)[:, None]
            errors.append(((w * (val_gram @ w)).sum() - 2 * (w * val_targets).sum()).item())  # + n_val: a constant
        return self._best(errors)

    def _choose_ridge_task(self, h: torch.Tensor, y: torch.Tensor, val: torch.Tensor, fit: torch.Tensor) -> float:
        """RanPAC's choice: fit on 80 % of this update's data alone, keep the ridge of the least mean squared
        error on the other 20 %."""
        h_fit, h_val, y_fit = h[fit], h[val], y[fit]
        if len(fit) < self.projection_dim:  # the same fit in its dual form, W = H^T (H H^T + r I)^-1 Y: n x n, not M x M
            evals, evecs = torch.linalg.eigh(h_fit @ h_fit.t())
            left, right = h_val @ h_fit.t() @ evecs, evecs.t() @ y_fit
        else:
            evals, evecs = torch.linalg.eigh(h_fit.t() @ h_fit)
            left, right = h_val @ evecs, evecs.t() @ (h_fit.t() @ y_fit)
        return self._best([((left / (evals + r)) @ right - y[val]).pow(2).mean().item() for r in RIDGE_GRID])

    def shift_classes(self, before, after, labels) -> None:
        """A class's projected features all move by the mean displacement of its samples' projections:
        ``Q``'s column by ``n d`` and ``G`` by ``n (m' m'^T - m m^T)``, ``m`` the class's mean projected feature
        (``Q``'s column / ``n``) and ``m' = m + d``."""
        delta = (self.project(after) - self.project(before)).to(self.gram)
        ids, shifts = self._class_means(delta, labels.to(delta.device))
        parts = [(self.gram, self.targets, self.counts)]
        if self.ridge_choice == "seen":  # the hold-out's share moves with its class too
            parts.append((self.val_gram, self.val_targets, self.val_counts))
        for c, d in zip(ids, shifts):
            for gram, targets, counts in parts:
                n = counts[c]
                if n == 0:
                    continue
                old = targets[:, c] / n
                new = old + d
                gram += n * (torch.outer(new, new) - torch.outer(old, old))
                targets[:, c] = n * new
        self._weight = None

    def weight(self) -> torch.Tensor:
        """The ridge solution (M, C), computed once per update."""
        if self._weight is None or self._weight.shape[1] != self.num_classes:
            eye = torch.eye(self.projection_dim, dtype=self.gram.dtype, device=self.gram.device)
            self._weight = torch.linalg.solve(self.gram + self.ridge * eye, self.targets).float()
        return self._weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(features.float()) @ self.weight().to(features.device)


def build_head(name: str, feature_dim: int, **settings) -> ContinualHead | None:
    """The head `name` (None for ``text``: the model's own text classifier) on `feature_dim`-dim features."""
    check_head_name(name)
    if name == TEXT:
        return None
    cls = HEADS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "feature_dim"}
    return cls(feature_dim, **{k: v for k, v in settings.items() if k in accepted and v is not None})
