"""The feature bank: what PMI keeps of earlier classes instead of their images (method.md, steps 1-4).

Per class (integer ids ``0 .. C-1`` in order of arrival): a Gaussian of the un-normalised
``visual_projection`` output (mean and population std; optionally a shrunk full covariance), the
number of real features it was estimated from, and the state dict of its contrastive model g_c.
Shared by all classes: the per-layer `LayerStatistics`, merged across tasks.

For learning new classes from their names (`hf_pmi.names_only`) the bank also keeps, per class, a
diagonal Gaussian of the *raw* (pre-trained, adapter-free) CLIP's image features
(``raw_means`` / ``raw_stds``), the raw CLIP's layer statistics, and which classes were themselves
learned from their names only (``names_only_classes``).

Saved as ``feature_bank.safetensors`` + ``feature_bank.json``; pickles are never read.

Example:
    >>> import tempfile, torch
    >>> from hf_pmi.bank import FeatureBank
    >>> bank = FeatureBank()
    >>> bank.add_classes([0, 1], {0: torch.randn(30, 8), 1: torch.randn(30, 8) + 3}, contrastive_epochs=2)
    >>> x, y = bank.sample([0, 1], per_class=5, generator=torch.Generator().manual_seed(0))
    >>> tuple(x.shape), y.tolist()
    ((10, 8), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     bank.save_pretrained(d)
    ...     torch.equal(FeatureBank.from_pretrained(d).means, bank.means)
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable

import torch
from torch import nn

from .contrastive import ContrastiveModel, gaussian_sample, sample_class_features
from .contrastive import train_contrastive as fit_contrastive
from .checkpoint import task_checksums
from .integrity import load_safetensors, read_json, sha256_file, verify_checksums, write_json
from .resolve import is_pickle_name, resolve_pretrained_folder
from .statistics import LayerStatistics, collect_statistics_and_features
from .validation import ValidationError, require_count

FOLDER_NAME = "feature_bank"  # the bank's subfolder in a task checkpoint
WEIGHTS_NAME = "feature_bank.safetensors"
CONFIG_NAME = "feature_bank.json"
FORMAT_VERSION = 1
SELECTIONS = ("cfs", "gaussian")


@dataclass
class SamplingConfig:
    """How replay targets are drawn from the bank (flags ``--sampling_<field>``): how many per class, and how.

    Example:
        >>> SamplingConfig().per_class, SamplingConfig(selection="gaussian").selection
        (5, 'gaussian')
    """

    flag_prefix: ClassVar[str] = "sampling_"
    argument_group: ClassVar[str] = "replay targets (SamplingConfig)"

    per_class: int = field(default=5, metadata={"help": "Replay samples per seen class (reference 5)."})
    selection: str = field(
        default="cfs",
        metadata={"help": "'cfs' (contrastive feature selection, reference; trains a contrastive model per class) "
                  "or 'gaussian' (plain samples of the class Gaussian)."},
    )

    def __post_init__(self):
        require_count(self.flag_prefix + "per_class", self.per_class)
        if self.selection not in SELECTIONS:
            raise ValidationError(f"{self.flag_prefix}selection must be one of {list(SELECTIONS)}, got {self.selection!r}.")


class FeatureBank:
    """Class Gaussians, contrastive models and layer statistics of every class seen so far.

    Args:
        covariance: ``"diag"`` (the reference) or ``"full"`` (beyond the reference: a full
            covariance shrunk toward a scaled identity, sampled through its Cholesky factor).
        shrinkage: weight ``lam`` of the identity target, ``(1 - lam) S + lam * tr(S)/d * I``.
            0.1 keeps S positive definite when a class has fewer samples than dimensions (a CLIP
            class of ~50 images vs 512 dims) while changing well-estimated directions little.
    """

    def __init__(self, covariance: str = "diag", shrinkage: float = 0.1):
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}.")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}.")
        self.covariance = covariance
        self.shrinkage = float(shrinkage)
        self._means: list[torch.Tensor] = []
        self._stds: list[torch.Tensor] = []
        self._counts: list[int] = []
        self._covs: list[torch.Tensor] = []
        self.contrastive: dict[int, dict[str, torch.Tensor]] = {}
        self.statistics: LayerStatistics | None = None
        self._raw_means: list[torch.Tensor] = []
        self._raw_stds: list[torch.Tensor] = []
        self.raw_statistics: LayerStatistics | None = None
        self.names_only_classes: list[int] = []

    # ----- contents --------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self._means)

    @property
    def feature_dim(self) -> int | None:
        return self._means[0].numel() if self._means else None

    @property
    def means(self) -> torch.Tensor:
        """(C, P) class means."""
        return torch.stack(self._means) if self._means else torch.empty(0)

    @property
    def stds(self) -> torch.Tensor:
        """(C, P) per-dimension population standard deviations."""
        return torch.stack(self._stds) if self._stds else torch.empty(0)

    @property
    def counts(self) -> torch.Tensor:
        return torch.tensor(self._counts, dtype=torch.int64)

    @property
    def covariances(self) -> torch.Tensor | None:
        """(C, P, P) shrunk covariances (``covariance="full"`` only)."""
        return torch.stack(self._covs) if self._covs else None

    def __repr__(self) -> str:
        return (
            f"FeatureBank(num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
            f"covariance={self.covariance!r}, contrastive={len(self.contrastive)}, statistics={self.statistics})"
        )

    # ----- building --------------------------------------------------------------------------
    def add_classes(
        self,
        class_ids: Iterable[int],
        features: dict[int, torch.Tensor],
        train_contrastive: bool = True,
        contrastive_epochs: int = 200,  # reference: 200 epochs
        contrastive_lr: float = 1e-2,  # reference: Adam lr 1e-2
        tau: float = 1.0,  # reference: tau = 1
        seed: int = 0,
        progress: bool = False,
        contrastive_keep: str = "pre_step",
        contrastive_drop_last: bool = False,
    ) -> None:
        """Store the Gaussian (and g_c) of each new class from its real features ``(n_c, P)``.

        `class_ids` must continue the bank's numbering (``num_classes, num_classes + 1, ...``);
        earlier classes are never re-estimated. `progress` shows a bar over the classes (the
        contrastive models take most of the time). `contrastive_keep` / `contrastive_drop_last`: how
        g_c is trained (`hf_pmi.contrastive.train_contrastive`'s ``keep`` / ``drop_last``).
        """
        from tqdm.auto import tqdm

        class_ids = [int(c) for c in class_ids]
        expected = list(range(self.num_classes, self.num_classes + len(class_ids)))
        if class_ids != expected:
            raise ValueError(
                f"Class ids arrive in order: this bank holds {self.num_classes} classes, so the next ids "
                f"are {expected}, got {class_ids}. Map your labels to 0..C-1 in order of arrival."
            )
        for c in tqdm(class_ids, desc="feature bank", disable=not progress, leave=False):
            if c not in features:
                raise KeyError(f"No features given for class {c}.")
            f = features[c].detach().to("cpu", torch.float32)
            if f.dim() != 2 or f.shape[0] < 1:
                raise ValueError(f"Features of class {c} must be (n >= 1, P), got {tuple(f.shape)}.")
            if self.feature_dim is not None and f.shape[1] != self.feature_dim:
                raise ValueError(f"Class {c} has {f.shape[1]}-dim features, the bank {self.feature_dim}.")
            mean = f.mean(dim=0)
            self._means.append(mean)
            self._stds.append(f.std(dim=0, unbiased=False))
            self._counts.append(f.shape[0])
            if self.covariance == "full":
                centred = f - mean
                cov = centred.T @ centred / f.shape[0]
                target = torch.eye(cov.shape[0]) * cov.diagonal().mean()
                self._covs.append((1 - self.shrinkage) * cov + self.shrinkage * target)
            if train_contrastive:
                g = fit_contrastive(f, epochs=contrastive_epochs, lr=contrastive_lr, tau=tau, seed=seed + c,
                                    keep=contrastive_keep, drop_last=contrastive_drop_last)
                self.contrastive[c] = {k: v.clone() for k, v in g.state_dict().items()}

    @property
    def num_raw_classes(self) -> int:
        """Classes ``0 .. num_raw_classes - 1`` have a Gaussian of the raw CLIP's features."""
        return len(self._raw_means)

    @property
    def raw_means(self) -> torch.Tensor:
        """(C, P) class means of the raw (pre-trained) CLIP's image features."""
        return torch.stack(self._raw_means) if self._raw_means else torch.empty(0)

    @property
    def raw_stds(self) -> torch.Tensor:
        """(C, P) population stds of the raw CLIP's image features."""
        return torch.stack(self._raw_stds) if self._raw_stds else torch.empty(0)

    def add_raw_classes(self, class_ids: Iterable[int], features: dict[int, torch.Tensor]) -> None:
        """Store the raw-CLIP Gaussian of each class from its raw features ``(n_c, P)`` (ids in order, as `add_classes`)."""
        class_ids = [int(c) for c in class_ids]
        expected = list(range(self.num_raw_classes, self.num_raw_classes + len(class_ids)))
        if class_ids != expected:
            raise ValueError(f"Raw Gaussians arrive in class order: the next ids are {expected}, got {class_ids}.")
        for c in class_ids:
            f = features[c].detach().to("cpu", torch.float32)
            self._raw_means.append(f.mean(dim=0))
            self._raw_stds.append(f.std(dim=0, unbiased=False))

    def update_raw_statistics(self, stats: LayerStatistics) -> None:
        """Merge a task's layer statistics of the raw CLIP (count-weighted)."""
        self.raw_statistics = stats if self.raw_statistics is None else self.raw_statistics.merge(stats)

    def update_statistics(self, stats: LayerStatistics) -> None:
        """Merge a task's layer statistics into the bank's (count-weighted)."""
        self.statistics = stats if self.statistics is None else self.statistics.merge(stats)

    def contrastive_model(self, class_id: int) -> ContrastiveModel:
        """g_c of a class, rebuilt from its state dict, in eval mode."""
        if class_id not in self.contrastive:
            raise ValueError(
                f"Class {class_id} has no contrastive model: add it with add_classes(..., train_contrastive=True) "
                "or sample with selection='gaussian'."
            )
        g = ContrastiveModel(self.feature_dim)
        g.load_state_dict(self.contrastive[class_id])
        return g.eval()

    # ----- sampling --------------------------------------------------------------------------
    def sample_class(
        self,
        class_id: int,
        n: int,
        generator: torch.Generator | None = None,
        selection: str = "cfs",
        boost: int = 20,  # reference for CLIP: CFS-select 5 * 20, keep 5
        batch: int = 20,  # reference: b = 20
        rho: float = 0.5,  # reference: rho = 0.5
        tau: float = 1.0,  # reference: tau = 1
        exact_standardise: bool = False,
        unbiased_std: bool = False,
    ) -> torch.Tensor:
        """``n`` target features ``(n, P)`` of one class, by CFS or plain Gaussian sampling."""
        if not 0 <= class_id < self.num_classes:
            raise IndexError(f"Class {class_id} is not in the bank ({self.num_classes} classes).")
        mean, std = self._means[class_id], self._stds[class_id]
        tril = torch.linalg.cholesky(self._covs[class_id]) if self.covariance == "full" else None
        if selection == "gaussian":
            if tril is None:
                return gaussian_sample(mean, std, n, generator)
            return mean + torch.randn(n, mean.numel(), generator=generator) @ tril.T
        if selection == "cfs":
            return sample_class_features(
                mean, std, self.contrastive_model(class_id), n, boost=boost, batch=batch, rho=rho, tau=tau,
                generator=generator, exact_standardise=exact_standardise, scale_tril=tril, unbiased_std=unbiased_std,
            )
        raise ValueError(f"selection must be 'cfs' or 'gaussian', got {selection!r}.")

    def sample(
        self,
        class_ids: Iterable[int],
        per_class: int,
        generator: torch.Generator | None = None,
        selection: str = "cfs",
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` targets for each class in `class_ids`: ``(features (n, P), labels (n,))``.

        Extra keyword arguments go to `sample_class` (boost, batch, rho, tau, exact_standardise, unbiased_std).
        """
        class_ids = [int(c) for c in class_ids]
        feats = [self.sample_class(c, per_class, generator, selection, **kwargs) for c in class_ids]
        labels = torch.tensor(class_ids, dtype=torch.int64).repeat_interleave(per_class)
        return torch.cat(feats) if feats else torch.empty(0, self.feature_dim or 0), labels

    # ----- persistence -----------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        if self.num_classes:
            tensors["means"] = self.means.contiguous()
            tensors["stds"] = self.stds.contiguous()
            tensors["counts"] = self.counts
            if self._covs:
                tensors["covariances"] = self.covariances.contiguous()
        for c, state in self.contrastive.items():
            for k, v in state.items():
                tensors[f"contrastive.{c}.{k}"] = v.contiguous()
        if self.statistics is not None:
            tensors.update(self.statistics.to_tensors(prefix="statistics."))
        if self._raw_means:
            tensors["raw_means"] = self.raw_means.contiguous()
            tensors["raw_stds"] = self.raw_stds.contiguous()
        if self.raw_statistics is not None:
            tensors.update(self.raw_statistics.to_tensors(prefix="raw_statistics."))
        return tensors

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``feature_bank.safetensors`` and ``feature_bank.json`` into `save_directory`."""
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        config = {
            "format": "hf_pmi.FeatureBank",
            "version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "covariance": self.covariance,
            "shrinkage": self.shrinkage,
            "contrastive_classes": sorted(self.contrastive),
            "has_statistics": self.statistics is not None,
            "raw_classes": self.num_raw_classes,
            "has_raw_statistics": self.raw_statistics is not None,
            "names_only_classes": self.names_only_classes,
        }
        save_file(self.to_tensors(), str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})
        config["checksums"] = {WEIGHTS_NAME: sha256_file(str(save_directory / WEIGHTS_NAME))}  # verified on load
        write_json(str(save_directory / CONFIG_NAME), config, seal=True)  # its own sha256 too: read_json verifies it

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, revision: str | None = None, subfolder: str | None = None
    ) -> "FeatureBank":
        """Load a bank from a local directory or a Hub repo (`hf_pmi.resolve`: safetensors and JSON only).

        A directory or repo that holds a pickle-like file (`hf_pmi.resolve.PICKLE_PATTERNS`) instead
        of ``feature_bank.safetensors`` is refused with a `ValueError`: pickles can run code when loaded.
        The checksum recorded in ``feature_bank.json`` is verified first (`hf_pmi.integrity`).
        """
        folder = Path(resolve_pretrained_folder(path_or_repo_id, revision=revision, subfolder=subfolder,
                                                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
        if not (folder / WEIGHTS_NAME).is_file():
            listing = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            if not Path(path_or_repo_id).is_dir():  # a Hub repo: what it offers, not what was downloaded
                from .resolve import hub_api

                prefix = f"{subfolder.strip('/')}/" if subfolder else ""
                files = hub_api().list_repo_files(str(path_or_repo_id), revision=revision)
                listing = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
            _refuse_or_missing(listing, str(folder))
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: a bank is saved with FeatureBank.save_pretrained.")
        config = read_json(str(config_path))
        verify_checksums(str(folder), config.get("checksums") or task_checksums(str(folder)))  # older banks: the task's
        if config.get("format") != "hf_pmi.FeatureBank" or config.get("version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{config_path} is not a FeatureBank of format version <= {FORMAT_VERSION} "
                f"(got format={config.get('format')!r}, version={config.get('version')}); upgrade hf_pmi."
            )
        tensors = load_safetensors(str(folder / WEIGHTS_NAME))
        _check_config_matches_tensors(config, tensors, config_path)
        bank = cls(covariance=config["covariance"], shrinkage=config["shrinkage"])
        if config["num_classes"]:
            bank._means = list(tensors["means"].unbind(0))
            bank._stds = list(tensors["stds"].unbind(0))
            bank._counts = tensors["counts"].tolist()
            if "covariances" in tensors:
                bank._covs = list(tensors["covariances"].unbind(0))
        for c in config["contrastive_classes"]:
            head = f"contrastive.{c}."
            bank.contrastive[int(c)] = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
        if config["has_statistics"]:
            bank.statistics = LayerStatistics.from_tensors(tensors, prefix="statistics.")
        if config.get("raw_classes"):  # absent in banks written before raw Gaussians existed
            bank._raw_means = list(tensors["raw_means"].unbind(0))
            bank._raw_stds = list(tensors["raw_stds"].unbind(0))
        if config.get("has_raw_statistics"):
            bank.raw_statistics = LayerStatistics.from_tensors(tensors, prefix="raw_statistics.")
        bank.names_only_classes = [int(c) for c in config.get("names_only_classes", [])]
        return bank


def _check_config_matches_tensors(config: dict, tensors: dict, config_path) -> None:
    """The JSON's class count and contrastive classes must describe the saved tensors."""
    stored = tensors["means"].shape[0] if "means" in tensors else 0
    contrastive = [int(c) for c in config.get("contrastive_classes", [])]
    if config.get("num_classes") != stored or any(not 0 <= c < stored for c in contrastive):
        raise ValueError(
            f"{config_path} says num_classes={config.get('num_classes')} (contrastive classes {contrastive}) but "
            f"{WEIGHTS_NAME} holds {stored} classes: the two files disagree (edited, or from different banks). "
            f"Restore an intact copy of the checkpoint, or set num_classes to {stored}."
        )


def _refuse_or_missing(listing: list[str], where: str) -> None:
    pickles = sorted(f for f in listing if is_pickle_name(f.lower()))
    if pickles:
        raise ValueError(
            f"{where} holds no {WEIGHTS_NAME} but pickle files {pickles}. Pickles are refused: loading one "
            "can run arbitrary code. Load it yourself only if you trust its author, rebuild the bank "
            f"(FeatureBank().add_classes(...)) and re-save it with FeatureBank.save_pretrained, which "
            f"writes {WEIGHTS_NAME} + {CONFIG_NAME}."
        )
    raise FileNotFoundError(f"{where} holds no {WEIGHTS_NAME}; save a bank there with FeatureBank.save_pretrained.")


@torch.no_grad()
def class_features(model: nn.Module, pixel_batches_with_labels: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Un-normalised image features (the ``visual_projection`` output) of real images, per label.

    `pixel_batches_with_labels` yields ``(pixel_values (B, 3, H, W), labels (B,))``. Runs in eval
    mode (restored after); returns float32 CPU tensors ``{label: (n_label, P)}``.

    Example:
        >>> from hf_pmi.testing import build_clip
        >>> feats = class_features(build_clip("tiny"), [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))])
        >>> sorted(feats), tuple(feats[0].shape)
        ([0, 1], (2, 16))
    """
    return collect_statistics_and_features(model, pixel_batches_with_labels)[1]
