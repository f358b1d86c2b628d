"""Per-layer activation statistics of the CLIP vision tower (method.md, step 1).

ViTs have no BatchNorm running statistics, so PMI records its own: for every hooked activation,
the mean and variance **per token position**, averaged over the batch and hidden dimensions
(vectors of length ``num_tokens``; for the patch map, of length ``grid * grid``). They are kept
as a sample count plus running first and second moments, so that statistics of several tasks
merge exactly (count-weighted), as if they had been computed on the concatenated data.

Keys (``L`` encoder layers, ``k`` in ``0 .. L-1``):

- ``"patch"``: the patch map entering block 1, ``(B, D, g, g)``; moments over batch and channels.
- ``"patch_channel"``: the same patch map per channel (vectors of length ``D``), moments over batch
  and positions: the reference's statistics of block 1's input.
- ``"pre_ln_input"``: tokens after the class token and positions, before ``pre_layrnorm``.
- ``"layer{k}.input"``, ``"layer{k}.ln1"``, ``"layer{k}.ln2"``: input, ``layer_norm1`` output and
  ``layer_norm2`` output of encoder layer ``k``.
- ``"post_input"``: the last encoder layer's output (input of the "post" block). Not in the
  reference; recorded so that the inversion of the post block has statistics of its own input.

Example:
    >>> import torch
    >>> from hf_pmi.statistics import collect_layer_statistics
    >>> from hf_pmi.testing import build_clip
    >>> model = build_clip("tiny")
    >>> stats = collect_layer_statistics(model, [torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)])
    >>> stats.count("layer0.input"), tuple(stats.mean("layer0.input").shape), tuple(stats.var("patch").shape)
    (7, (65,), (64,))
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .blocks import VisionBlocks

# Added to variances inside logs and divisions: activations of a layer-normed ViT have variances
# of order 1e-2 .. 1e2, so 1e-8 changes nothing measurable while keeping log(0) out.
KL_EPS = 1e-8


def token_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-position mean and (population) variance.

    ``(B, N, D)`` tokens: moments over dims (0, 2) -> two vectors of length N.
    ``(B, D, g, g)`` patch map: moments per spatial position over batch and channels -> length g*g.

    Example:
        >>> m, v = token_moments(torch.ones(2, 5, 3))
        >>> m.tolist(), v.tolist()
        ([1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0])
    """
    if x.dim() == 4:
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D): a position is a "token"
    if x.dim() != 3:
        raise ValueError(f"token_moments expects (B, N, D) tokens or a (B, D, g, g) patch map, got {tuple(x.shape)}.")
    mean = x.mean(dim=(0, 2))
    var = x.var(dim=(0, 2), unbiased=False)
    return mean, var


def kl_moments(m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor, eps: float = KL_EPS) -> torch.Tensor:
    """KL(N(m1, v1) || N(m2, v2)) averaged over positions, as in method.md:

    ``0.5 * mean(log v2 - log v1 - 1 + (v1 + (m1 - m2)^2) / v2)`` (``eps`` added to both variances).

    Example:
        >>> float(kl_moments(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)))
        0.0
    """
    v1 = v1 + eps
    v2 = v2 + eps
    return 0.5 * torch.mean(torch.log(v2) - torch.log(v1) - 1.0 + (v1 + (m1 - m2) ** 2) / v2)


def _per_token_sums(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(batch size, per-token mean of x, per-token mean of x^2) in float64, for one batch."""
    if x.dim() == 4:
        x = x.flatten(2).transpose(1, 2)
    x = x.detach().to(torch.float64)
    return x.shape[0], x.mean(dim=(0, 2)), (x * x).mean(dim=(0, 2))


class LayerStatistics:
    """Count plus running first/second moments per key; exact count-weighted merges.

    Every sample contributes the same number of hidden values per token, so weighting by the
    number of samples is exact. Moments are held in float64 (merging many tasks in float32 would
    lose digits in ``E[x^2] - E[x]^2``).

    Example:
        >>> a, b = LayerStatistics(), LayerStatistics()
        >>> a.update("t", torch.zeros(2, 1, 4)); b.update("t", torch.ones(2, 1, 4))
        >>> merged = a.merge(b)
        >>> merged.mean("t").tolist(), merged.var("t").tolist(), merged.count("t")
        ([0.5], [0.25], 4)
    """

    def __init__(self):
        self._count: dict[str, int] = {}
        self._m1: dict[str, torch.Tensor] = {}
        self._m2: dict[str, torch.Tensor] = {}

    # ----- accumulation ----------------------------------------------------------------------
    def update(self, key: str, x: torch.Tensor) -> None:
        """Add one batch of activations ``(B, N, D)`` or patch maps ``(B, D, g, g)`` under `key`."""
        n, m1, m2 = _per_token_sums(x)
        self._add(key, n, m1.cpu(), m2.cpu())

    def _add(self, key: str, n: int, m1: torch.Tensor, m2: torch.Tensor) -> None:
        if key not in self._count:
            self._count[key], self._m1[key], self._m2[key] = n, m1.clone(), m2.clone()
            return
        if self._m1[key].shape != m1.shape:
            raise ValueError(
                f"Statistics for {key!r} have {self._m1[key].numel()} positions, the new ones {m1.numel()}: "
                "they come from different architectures or image sizes and cannot be merged."
            )
        total = self._count[key] + n
        w_old, w_new = self._count[key] / total, n / total
        self._m1[key] = w_old * self._m1[key] + w_new * m1
        self._m2[key] = w_old * self._m2[key] + w_new * m2
        self._count[key] = total

    def merge(self, other: "LayerStatistics") -> "LayerStatistics":
        """A new object holding the count-weighted merge of `self` and `other` (both unchanged)."""
        out = LayerStatistics()
        for src in (self, other):
            for key in src.keys():
                out._add(key, src._count[key], src._m1[key], src._m2[key])
        return out

    # ----- access ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._count)

    def __contains__(self, key: str) -> bool:
        return key in self._count

    def __len__(self) -> int:
        return len(self._count)

    def _check(self, key: str) -> None:
        if key not in self._count:
            raise KeyError(f"No statistics for {key!r}; recorded keys: {self.keys()}.")

    def count(self, key: str) -> int:
        self._check(key)
        return self._count[key]

    def mean(self, key: str) -> torch.Tensor:
        """Per-token mean (float64 vector)."""
        self._check(key)
        return self._m1[key].clone()

    def var(self, key: str) -> torch.Tensor:
        """Per-token population variance (float64 vector, clamped at 0 against rounding)."""
        self._check(key)
        return (self._m2[key] - self._m1[key] ** 2).clamp_min(0.0)

    # ----- serialisation ---------------------------------------------------------------------
    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat dict of tensors (for safetensors): ``{prefix}{key}.count/.m1/.m2``."""
        out = {}
        for key in self.keys():
            out[f"{prefix}{key}.count"] = torch.tensor([self._count[key]], dtype=torch.int64)
            out[f"{prefix}{key}.m1"] = self._m1[key].contiguous()
            out[f"{prefix}{key}.m2"] = self._m2[key].contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "LayerStatistics":
        """Inverse of `to_tensors` (entries not starting with `prefix` are ignored)."""
        out = cls()
        keys = sorted(k[len(prefix) : -len(".count")] for k in tensors if k.startswith(prefix) and k.endswith(".count"))
        for key in keys:
            out._count[key] = int(tensors[f"{prefix}{key}.count"].item())
            out._m1[key] = tensors[f"{prefix}{key}.m1"].clone()
            out._m2[key] = tensors[f"{prefix}{key}.m2"].clone()
        return out

    def __repr__(self) -> str:
        counts = sorted(set(self._count.values()))
        return f"LayerStatistics({len(self)} keys, counts={counts})"


# ----- hooks ---------------------------------------------------------------------------------
def hook_points(blocks: VisionBlocks) -> list[tuple[str, nn.Module, str]]:
    """(key, module, "input"|"output") for every recorded activation of a vision tower."""
    points = [
        ("patch", blocks.embeddings.patch_embedding, "output"),
        ("pre_ln_input", blocks.pre_layrnorm, "input"),
    ]
    for k, layer in enumerate(blocks.layers):
        points += [
            (f"layer{k}.input", layer, "input"),
            (f"layer{k}.ln1", layer.layer_norm1, "output"),
            (f"layer{k}.ln2", layer.layer_norm2, "output"),
        ]
    points.append(("post_input", blocks.layers[-1], "output"))
    return points


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of `model` in eval mode; restore each one's own flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def capture_activations(points: Iterable[tuple[str, nn.Module, str]]) -> Iterator[dict[str, torch.Tensor]]:
    """Register hooks that store activations (with their autograd graph) in the yielded dict.

    Hooks are removed when the block exits, also when it raises.

    Example:
        >>> from hf_pmi.testing import build_clip
        >>> blocks = VisionBlocks(build_clip("tiny"))
        >>> with capture_activations([("x", blocks.layers[0].layer_norm1, "output")]) as acts:
        ...     _ = blocks.features(torch.randn(2, 3, 32, 32))
        >>> tuple(acts["x"].shape)
        (2, 65, 32)
    """
    store: dict[str, torch.Tensor] = {}
    handles = []

    def make(key, where):
        if where == "input":
            return lambda module, args: store.__setitem__(key, args[0])
        return lambda module, args, output: store.__setitem__(key, output[0] if isinstance(output, tuple) else output)

    try:
        for key, module, where in points:
            if where == "input":
                handles.append(module.register_forward_pre_hook(make(key, where)))
            elif where == "output":
                handles.append(module.register_forward_hook(make(key, where)))
            else:
                raise ValueError(f"Hook position must be 'input' or 'output', got {where!r}.")
        yield store
    finally:
        for handle in handles:
            handle.remove()


def collect_layer_statistics(model: nn.Module, pixel_batches: Iterable[torch.Tensor], progress: bool = False) -> LayerStatistics:
    """Run the vision tower on `pixel_batches` (processor-normalised ``(B, 3, H, W)`` tensors) and
    return the per-token statistics of every hook point (see module docstring).

    `model` is a `CLIPModel` or anything `hf_pmi.blocks.unwrap_clip` handles (peft, DDP,
    ContinualCLIP). Runs under ``torch.no_grad()`` in eval mode (the mode is restored after);
    hooks are always removed, also on error.
    """
    unlabelled = ((pixels, torch.zeros(pixels.shape[0], dtype=torch.long)) for pixels in pixel_batches)
    return collect_statistics_and_features(model, unlabelled, progress)[0]


def collect_statistics_and_features(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], progress: bool = False
) -> tuple[LayerStatistics, dict[int, torch.Tensor]]:
    """One pass over ``(pixels, labels)`` batches: the layer statistics and, per label, the
    un-normalised image features (float32, CPU) that the feature bank's Gaussians are fitted to."""
    from tqdm.auto import tqdm

    blocks = VisionBlocks(model)
    stats = LayerStatistics()
    chunks: dict[int, list[torch.Tensor]] = {}
    device = blocks.embeddings.patch_embedding.weight.device
    with eval_mode(model), torch.no_grad(), capture_activations(hook_points(blocks)) as acts:
        for pixels, labels in tqdm(batches, desc="layer statistics", disable=not progress):
            acts.clear()
            feats = blocks.features(pixels.to(device)).float().cpu()
            for key, value in acts.items():
                stats.update(key, value)
            stats.update("patch_channel", acts["patch"].flatten(2))  # (B, D, g*g): per-channel moments
            labels = torch.as_tensor(labels).cpu()
            for c in labels.unique().tolist():
                chunks.setdefault(int(c), []).append(feats[labels == c])
    if len(stats) == 0:
        raise ValueError("collect_layer_statistics got no batches: pass a non-empty iterable of pixel tensors.")
    return stats, {c: torch.cat(v) for c, v in sorted(chunks.items())}
