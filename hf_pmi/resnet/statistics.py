"""Statistics of a BatchNorm network for its inversion, and the class features its targets come from.

A BatchNorm layer already stores the per-channel mean and variance of its input (the running
moments): the prior of the per-layer inversion, with nothing to collect. What this module adds:

- `bn_kl`: the reference's statistics term, KL(N(batch moments) || N(running moments)) per channel,
  averaged over channels (``0.5 * mean(log v_run - log v - 1 + (v + (m - m_run)^2) / v_run)``);
- `collect_block_statistics`: per-channel moments of every block's input on real data (keys
  ``block{i}.input``), in a mergeable `hf_pmi.statistics.LayerStatistics`: an exact input prior
  for the chain instead of the reference's rough one, and the "real" side of the per-block
  diagnostics; it returns the pooled features per class in the same pass (for the class Gaussians).

Example:
    >>> import torch
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> from hf_pmi.resnet.blocks import BNBlocks
    >>> model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=2))
    >>> stats, feats = collect_block_statistics(model, [(torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 1, 0, 1]))])
    >>> tuple(stats.mean("block1.input").shape), {c: tuple(f.shape) for c, f in feats.items()}
    ((4,), {0: (2, 16), 1: (3, 16)})
    >>> bn = BNBlocks(model).bn_layers(1)[0][1]
    >>> float(bn_kl(torch.randn(4096, 4, 1, 1), bn)) < 0.01  # a standard normal batch matches fresh running moments
    True
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..statistics import LayerStatistics, eval_mode, kl_moments
from .blocks import BNBlocks

# The reference adds 1e-8 to batch variances before the log; running variances of a trained
# BatchNorm are >= its eps (1e-5), so nothing else needs guarding.
VAR_EPS = 1e-8


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance of ``(B, C, H, W)`` maps or ``(B, C)`` vectors.

    Example:
        >>> m, v = channel_moments(torch.ones(2, 3, 4, 4))
        >>> m.tolist(), v.tolist()
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    """
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def kl_to_prior(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(channel moments of x) || N(mean, var)), averaged over channels (`kl_moments`)."""
    m, v = channel_moments(x)
    return kl_moments(m, v, mean.to(x.dtype), var.to(x.dtype), eps=VAR_EPS)


def bn_kl(bn_input: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """The reference's BN statistics term for one BatchNorm layer and the batch entering it."""
    return kl_to_prior(bn_input, bn.running_mean.detach(), bn.running_var.detach())


def collect_block_statistics(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], image_size: int | None = None
) -> tuple[LayerStatistics, dict[int, torch.Tensor]]:
    """One pass over ``(pixel_values, labels)`` batches in eval mode (restored after), no gradients:
    the per-channel moments of every block's input (``block{i}.input``, i = 1 .. feature_block; block
    0's input is the pixels) and the pooled features of each label (float32, CPU)."""
    blocks = BNBlocks(model, image_size)
    stats = LayerStatistics()
    chunks: dict[int, list[torch.Tensor]] = {}
    device = next(blocks.model.parameters()).device
    with eval_mode(blocks.model), torch.no_grad():
        for pixels, labels in batches:
            x = pixels.to(device)
            for i in range(blocks.feature_block + 1):
                if i > 0:
                    stats.update(f"block{i}.input", x.flatten(2))  # (B, C, HW): a channel is a "token"
                x = blocks.block(i, x)
            feats = blocks.pool(x).float().cpu()
            labels = torch.as_tensor(labels).cpu()
            for c in labels.unique().tolist():
                chunks.setdefault(int(c), []).append(feats[labels == c])
    if len(stats) == 0 and not chunks:
        raise ValueError("collect_block_statistics got no batches: pass a non-empty iterable of (pixels, labels).")
    return stats, {c: torch.cat(v) for c, v in sorted(chunks.items())}
