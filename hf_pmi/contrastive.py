"""Per-class contrastive model g_c and contrastive feature selection (CFS) (method.md, steps 3-4).

A class is stored as a diagonal Gaussian of its image features. Plain Gaussian samples bunch up
near the mean; CFS uses a tiny MLP trained with a uniformity loss on the class's real features to
pick candidates that are *dissimilar* to those already accepted, then corrects the first two
moments of the selected set back to the class's.

Example:
    >>> import torch
    >>> from hf_pmi.contrastive import train_contrastive, sample_class_features
    >>> feats = torch.randn(50, 8) * 2 + 1
    >>> g = train_contrastive(feats, epochs=5)
    >>> x = sample_class_features(feats.mean(0), feats.std(0, unbiased=False), g, n=5,
    ...                           generator=torch.Generator().manual_seed(0))
    >>> tuple(x.shape)
    (5, 8)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .validation import ValidationError, require, require_count, require_positive

# LeakyReLU slope: PyTorch's default (0.01), which the reference uses through nn.LeakyReLU().
LEAKY_SLOPE = 0.01
# Below this, a selected set's per-dimension std is treated as zero and left unscaled.
STD_EPS = 1e-12
KEEPS = ("pre_step", "post_step")

# The reference's CFS and contrastive models where hf_pmi's defaults differ, as the values of those settings.
# `SelectionConfig(preset="reference")` applies them to every field left at its default.
REFERENCE_PRESET: dict[str, Any] = {
    "unbiased_std": True,  # torch.std of the selected set in the moment compensation
    "contrastive_keep": "post_step",  # the weights after the step whose (pre-step) batch loss was lowest
    "contrastive_drop_last": True,  # DataLoader(drop_last=True): only full batches of min(64, n)
}
PRESETS = {"reference": REFERENCE_PRESET}


def apply_preset(config, presets: dict[str, dict[str, Any]]) -> None:
    """Set every field of dataclass `config` that is at its default to the value of ``presets[config.preset]``
    (a field given explicitly at its default value cannot be told apart: the preset sets it)."""
    if config.preset not in ("", *presets):
        raise ValidationError(f"{config.flag_prefix}preset must be one of {['', *presets]}, got {config.preset!r}.")
    if not config.preset:
        return
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(config)}
    for name, value in presets[config.preset].items():
        if getattr(config, name) == defaults[name]:
            setattr(config, name, value)


@dataclass
class SelectionConfig:
    """Contrastive feature selection (CFS) settings (flags ``--cfs_<field>``); defaults are the reference's CLIP values.

    Example:
        >>> SelectionConfig().boost, SelectionConfig(rho=0.0)
        Traceback (most recent call last):
        ...
        hf_pmi.validation.ValidationError: cfs_rho=0.0 is invalid: it must be in (0, 1] (an acceptance ratio).
    """

    flag_prefix: ClassVar[str] = "cfs_"
    argument_group: ClassVar[str] = "contrastive feature selection (SelectionConfig)"

    preset: str = field(
        default="",
        metadata={"help": "'reference': the reference's CFS and contrastive models where hf_pmi differs (unbiased std "
                  "in the compensation, post-step weights kept, full batches only); fields given explicitly keep "
                  "their value. '': hf_pmi's defaults."},
    )
    boost: int = field(default=20, metadata={"help": "CFS selects per_class * boost features, then keeps per_class at random (reference 20)."})
    batch: int = field(default=20, metadata={"help": "CFS acceptance batch b (reference 20)."})
    rho: float = field(default=0.5, metadata={"help": "CFS acceptance ratio: b / rho candidates per round (reference 0.5)."})
    tau: float = field(default=1.0, metadata={"help": "Temperature of the contrastive similarity (reference 1)."})
    exact_standardise: bool = field(
        default=False, metadata={"help": "Exact moment standardisation after CFS instead of the reference formula."}
    )
    unbiased_std: bool = field(
        default=False,
        metadata={"help": "The selected set's std in the moment compensation: population (False) or unbiased, n - 1 "
                  "(True, reference: torch.std). The class std is the population std either way."},
    )
    contrastive_keep: str = field(
        default="pre_step",
        metadata={"help": "Weights of a contrastive model kept after training: 'pre_step' (those the lowest batch "
                  "loss was measured with) or 'post_step' (reference: those right after that batch's step)."},
    )
    contrastive_drop_last: bool = field(
        default=False,
        metadata={"help": "Contrastive models train on full batches of min(64, n) only (reference: drop_last=True). "
                  "False: the trailing partial batch too, unless it holds one sample."},
    )

    def __post_init__(self):
        apply_preset(self, PRESETS)
        require(self.contrastive_keep in KEEPS, self.flag_prefix + "contrastive_keep", self.contrastive_keep,
                f"one of {list(KEEPS)}")
        p = self.flag_prefix
        require_count(p + "boost", self.boost)
        require_count(p + "batch", self.batch)
        require(isinstance(self.rho, (int, float)) and 0 < self.rho <= 1, p + "rho", self.rho, "in (0, 1] (an acceptance ratio)")
        require_positive(p + "tau", self.tau, " (a temperature)")

    def sample_kwargs(self) -> dict:
        """Keyword arguments of `sample_class_features` (and `FeatureBank.sample_class`)."""
        return dict(boost=self.boost, batch=self.batch, rho=self.rho, tau=self.tau,
                    exact_standardise=self.exact_standardise, unbiased_std=self.unbiased_std)

    def contrastive_kwargs(self) -> dict:
        """Keyword arguments of `FeatureBank.add_classes` for training the contrastive models."""
        return dict(contrastive_keep=self.contrastive_keep, contrastive_drop_last=self.contrastive_drop_last)


class ContrastiveModel(nn.Module):
    """g_c: 2 x [Linear(d, d) -> BatchNorm1d(d) -> LeakyReLU], then L2-normalise.

    Example:
        >>> g = ContrastiveModel(4).eval()
        >>> torch.allclose(g(torch.randn(3, 4)).norm(dim=1), torch.ones(3))
        True
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(
            nn.Linear(dim, dim),
            nn.BatchNorm1d(dim),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(dim, dim),
            nn.BatchNorm1d(dim),
            nn.LeakyReLU(LEAKY_SLOPE),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)


def uniformity_loss(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``mean_i log(mean_j exp(z_i . z_j / tau))`` with j running over all samples, i included."""
    sim = z @ z.T / tau
    return (torch.logsumexp(sim, dim=1) - math.log(z.shape[0])).mean()


def train_contrastive(
    features: torch.Tensor,
    epochs: int = 200,  # reference: 200 epochs
    lr: float = 1e-2,  # reference: Adam, lr 1e-2
    tau: float = 1.0,  # reference: tau = 1
    batch_size: int = 64,  # reference: batch min(64, n)
    seed: int = 0,
    keep: str = "pre_step",
    drop_last: bool = False,
) -> ContrastiveModel:
    """Train g_c on one class's real features ``(n, d)`` with the uniformity loss.

    Adam, shuffled batches of ``min(batch_size, n)``: with `drop_last` only full batches (the
    reference's loader), else also the trailing partial batch unless it holds one sample (BatchNorm
    cannot train on it). Kept: the weights of the step with the lowest batch loss, as that loss was
    measured (``keep="pre_step"``) or right after that step (``"post_step"``, the reference). With
    fewer than 2 features there is nothing to spread apart: the initial model is returned.
    Returned in eval mode, on CPU, in float32.

    Example:
        >>> g = train_contrastive(torch.randn(20, 4), epochs=2)
        >>> g.training
        False
    """
    if features.dim() != 2:
        raise ValueError(f"train_contrastive expects features of shape (n, d), got {tuple(features.shape)}.")
    features = features.detach().to("cpu", torch.float32)
    n, d = features.shape
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ContrastiveModel(d)
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {list(KEEPS)}, got {keep!r}.")
    if n < 2:
        return model.eval()
    bs = max(2, min(batch_size, n))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best_loss, best_state = float("inf"), copy.deepcopy(model.state_dict())
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            if idx.numel() < 2 or (drop_last and idx.numel() < bs):
                continue
            loss = uniformity_loss(model(features[idx]), tau)
            best = loss.item() < best_loss
            if best and keep == "pre_step":  # the weights this loss was measured with
                best_loss, best_state = loss.item(), copy.deepcopy(model.state_dict())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if best and keep == "post_step":  # the weights right after this batch's step
                best_loss, best_state = loss.item(), copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def gaussian_sample(mean: torch.Tensor, std: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` samples of N(mean, diag(std^2)), shape ``(n, d)``, drawn on CPU from `generator`."""
    noise = torch.randn(n, mean.shape[-1], generator=generator, dtype=torch.float32)
    return mean.float().cpu() + noise * std.float().cpu()


def _draw(mean, std, n, generator, scale_tril):
    if scale_tril is None:
        return gaussian_sample(mean, std, n, generator)
    noise = torch.randn(n, mean.shape[-1], generator=generator, dtype=torch.float32)
    return mean.float().cpu() + noise @ scale_tril.float().cpu().T


def compensate_moments(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, exact_standardise: bool = False,
                       unbiased_std: bool = False) -> torch.Tensor:
    """Move the first two moments of a selected set ``x`` (n, d) toward the class's.

    Reference formula (default): ``(x + (mean - m)) * (std / s)``; exact standardisation:
    ``(x - m) * std / s + mean``. ``m``, ``s``: per-dimension mean and std of ``x`` (population std,
    or with `unbiased_std` the n - 1 one, as the reference's ``torch.std``).
    Where ``s`` is zero (a single sample, or a zero-variance dimension) the scale is left at 1.

    Example:
        >>> x = torch.tensor([[0.0], [2.0]])
        >>> compensate_moments(x, torch.zeros(1), torch.ones(1), exact_standardise=True, unbiased_std=True)
        tensor([[-0.7071],
                [ 0.7071]])
    """
    m = x.mean(dim=0)
    s = x.std(dim=0, unbiased=unbiased_std) if x.shape[0] > 1 else torch.zeros_like(m)
    scale = torch.where(s > STD_EPS, std / s.clamp_min(STD_EPS), torch.ones_like(s))
    if exact_standardise:
        return (x - m) * scale + mean
    return (x + (mean - m)) * scale


@torch.no_grad()
def contrastive_select(
    mean: torch.Tensor,
    std: torch.Tensor,
    model: ContrastiveModel,
    n: int,
    batch: int = 20,  # b: accepted per round (reference 20)
    rho: float = 0.5,  # acceptance ratio: b / rho = 40 candidates per round (reference 0.5)
    tau: float = 1.0,  # similarity temperature (reference 1)
    generator: torch.Generator | None = None,
    exact_standardise: bool = False,
    scale_tril: torch.Tensor | None = None,
    compensate: bool = True,
    unbiased_std: bool = False,
) -> torch.Tensor:
    """CFS: ``n`` features of one class, spread out by the contrastive model, moment-compensated.

    The first ``batch`` samples are accepted as drawn; every later round draws ``batch / rho``
    candidates, scores each by its mean similarity ``g(u) . g(v) / tau`` to the accepted set and
    accepts the ``batch`` lowest. Candidates come from N(mean, diag(std^2)), or from
    N(mean, L L^T) when a Cholesky factor `scale_tril` is given (full-covariance banks). The
    selected set is then moment-compensated (`compensate_moments`) unless ``compensate=False``.

    Example:
        >>> g = ContrastiveModel(4).eval()
        >>> contrastive_select(torch.zeros(4), torch.ones(4), g, n=30, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([30, 4])
    """
    if not 0 < rho <= 1:
        raise ValueError(f"rho is an acceptance ratio in (0, 1], got {rho}.")
    if batch < 1 or n < 1:
        raise ValueError(f"batch and n must be positive, got batch={batch}, n={n}.")
    mean, std = mean.float().cpu(), std.float().cpu()
    was_training = model.training
    model.eval()
    try:
        accepted = _draw(mean, std, min(batch, n), generator, scale_tril)
        embedded = model(accepted)
        num_candidates = max(batch, int(round(batch / rho)))
        while accepted.shape[0] < n:
            take = min(batch, n - accepted.shape[0])
            candidates = _draw(mean, std, num_candidates, generator, scale_tril)
            z = model(candidates)
            score = (z @ embedded.T / tau).mean(dim=1)
            idx = torch.argsort(score)[:take]  # the most dissimilar to what is accepted
            accepted = torch.cat([accepted, candidates[idx]])
            embedded = torch.cat([embedded, z[idx]])
    finally:
        model.train(was_training)
    return compensate_moments(accepted, mean, std, exact_standardise, unbiased_std) if compensate else accepted


def sample_class_features(
    mean: torch.Tensor,
    std: torch.Tensor,
    model: ContrastiveModel,
    n: int,
    boost: int = 20,  # reference for CLIP: select 5 * 20 = 100 ...
    batch: int = 20,  # ... in rounds of b = 20 ...
    rho: float = 0.5,
    tau: float = 1.0,
    generator: torch.Generator | None = None,
    exact_standardise: bool = False,
    scale_tril: torch.Tensor | None = None,
    unbiased_std: bool = False,
) -> torch.Tensor:
    """The reference CLIP recipe: CFS-select ``n * boost`` features, then keep ``n`` at random.

    Example:
        >>> g = ContrastiveModel(4).eval()
        >>> sample_class_features(torch.zeros(4), torch.ones(4), g, n=5, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([5, 4])
    """
    pool = contrastive_select(
        mean, std, model, n * boost, batch=batch, rho=rho, tau=tau, generator=generator,
        exact_standardise=exact_standardise, scale_tril=scale_tril, unbiased_std=unbiased_std,
    )
    keep = torch.randperm(pool.shape[0], generator=generator)[:n]
    return pool[keep]
