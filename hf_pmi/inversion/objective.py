"""The inversion objective: block losses, the full-model loss and random starts, from stored statistics.

`Objective` knows the vision tower as blocks (`hf_pmi.blocks.VisionBlocks`) and the stored layer
statistics: ``block_loss(i, z, target)`` is block i's loss of method.md step 5 (MSE to the target
plus the statistics KL of its hooked activations and its input), ``full_loss`` the refinement's
objective of step 6 (feature MSE, KL of every encoder layer's input, total variation).

Example:
    >>> import torch
    >>> x = torch.zeros(1, 1, 2, 2); x[0, 0, 0, 0] = 1.0
    >>> round(total_variation(x).item(), 4), round(total_variation(x, "norm").item(), 4)
    (2.0, 3.0)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..blocks import VisionBlocks
from ..statistics import LayerStatistics, capture_activations, kl_moments, token_moments
from .config import InversionConfig

# CLIP's image normalisation (OpenAI's statistics, the CLIPImageProcessor default): the reference's
# pixel path optimises pixels in [0, 1] and normalises them with these before the patch embedding.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REFERENCE_PIXEL_START = 32 / 224  # the reference starts pixel inversion at 32 px of ViT-B/16's 224


def total_variation(x: torch.Tensor, kind: str = "squared") -> torch.Tensor:
    """Total variation over the 4 neighbour directions (right, down and the two diagonals); 0 for
    non-image inputs. ``kind="squared"``: the mean of squared differences per direction
    (DeepInversion's); ``"norm"``: the L2 norm of the differences over space per (sample, channel),
    averaged over samples and channels (the reference's CLIP inversion).
    """
    if x.dim() != 4:
        return x.new_zeros(())
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )
    if kind == "norm":
        return sum(d.flatten(2).norm(dim=2).mean() for d in diffs)
    return sum(d.pow(2).mean() for d in diffs)


def feature_mse(out: torch.Tensor, target: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """MSE between image features (of L2-normalised features with `normalize`)."""
    if normalize:
        out, target = F.normalize(out, dim=-1), F.normalize(target, dim=-1)
    return F.mse_loss(out, target)


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off for every parameter (no weight gradients are built); restore after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic up-sampling of a coarse map to ``size`` (the identity at that size)."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


class Objective:
    """Losses of single blocks and of the full model, given the stored statistics."""

    def __init__(self, blocks: VisionBlocks, stats: LayerStatistics, config: InversionConfig, device, dtype):
        self.blocks, self.stats, self.config = blocks, stats, config
        self.device, self.dtype = device, dtype
        self.L = blocks.num_layers
        self.a_layer = config.layer_weight(blocks.num_blocks)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def moments(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._cache:
            if key not in self.stats:
                raise KeyError(
                    f"The layer statistics lack {key!r} (they hold {self.stats.keys()}): collect them with "
                    "hf_pmi.statistics.collect_layer_statistics on the same architecture (banks saved before "
                    "'patch_channel' existed need new statistics for patch_stats='channel')."
                )
            m = self.stats.mean(key).to(self.device, self.dtype)
            v = self.stats.var(key).to(self.device, self.dtype)
            self._cache[key] = (m, v)
        return self._cache[key]

    def input_key(self, i: int) -> str | None:
        """Statistics key of block i's input (None for pixels, which have no stored statistics).

        The post block's input is the last layer's output: "post_input" when recorded, else the
        last layer's input (the closest stored residual-stream statistics)."""
        if i == 0:
            return None
        if i == 1:
            return "patch_channel" if self.config.patch_stats == "channel" else "patch"
        if i == self.L + 2:
            return "post_input" if "post_input" in self.stats else f"layer{self.L - 1}.input"
        return f"layer{i - 2}.input"

    def hooked(self, i: int) -> list[tuple[str, nn.Module, str]]:
        """Activations inside block i whose statistics enter its KL term."""
        if i == 1:
            return [("pre_ln_input", self.blocks.pre_layrnorm, "input")] if self.config.pre_block_kl else []
        if 2 <= i <= self.L + 1:
            layer = self.blocks.layers[i - 2]
            k = i - 2
            return [(f"layer{k}.ln1", layer.layer_norm1, "output"), (f"layer{k}.ln2", layer.layer_norm2, "output")]
        return []

    def kl(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key == "patch_channel":  # (B, D, h, w): a channel is a "token", moments over batch and positions
            x = x.flatten(2)
        m, v = token_moments(x)
        return kl_moments(m, v, *self.moments(key))

    def block_loss(self, i: int, z: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
        """MSE(block_i(z), target) + a_layer * [sum_h KL(h) + KL(input)]. For block 1 the input KL is
        taken on the coarse variable `coarse` under per-channel statistics (the reference)."""
        with capture_activations(self.hooked(i)) as acts:
            out = self.blocks.block(i, z)
        if i == self.blocks.num_blocks - 1:
            loss = feature_mse(out, target, self.config.normalize_features)
        elif i == self.L + 1 and self.config.cls_target_last_layer:
            loss = F.mse_loss(out[:, 0], target[:, 0])
        else:
            loss = F.mse_loss(out, target)
        reg = sum((self.kl(key, acts[key]) for key, _, _ in self.hooked(i)), z.new_zeros(()))
        key = self.input_key(i)
        if key is not None:
            reg = reg + self.kl(key, coarse if key == "patch_channel" and coarse is not None else z)
        return loss + self.a_layer * reg

    def full_loss(self, start: int, x: torch.Tensor, target: torch.Tensor, tv_input: torch.Tensor | None = None) -> torch.Tensor:
        """MSE(F(x), target) + alpha_rf * sum_k KL(layer k input) + alpha_tv * TV(tv_input, default x)."""
        points = [(f"layer{k}.input", layer, "input") for k, layer in enumerate(self.blocks.layers) if k + 2 >= start]
        with capture_activations(points) as acts:
            out = self.blocks.forward_from(start, x)
        kl = sum((self.kl(key, acts[key]) for key, _, _ in points), x.new_zeros(()))
        return (
            feature_mse(out, target, self.config.normalize_features)
            + self.config.alpha_rf * kl
            + self.config.alpha_tv * total_variation(x if tv_input is None else tv_input, self.config.tv)
        )

    def pre_ln(self, u: torch.Tensor) -> torch.Tensor:
        """pre_layrnorm of tokens ``u`` (B, N, D) whose CLS slot is replaced by its fixed value."""
        emb = self.blocks.embeddings
        cls = (emb.class_embedding + emb.position_embedding.weight[0]).to(u.dtype)
        return self.blocks.pre_layrnorm(torch.cat([cls.expand(u.shape[0], 1, -1), u[:, 1:]], dim=1))

    def first_layer_loss(self, u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Block-2 loss with its input in the pre-layernorm's range; u ~ "pre_ln_input" statistics."""
        m, v = token_moments(u[:, 1:])  # the CLS slot is fixed, its statistics do not apply
        m2, v2 = self.moments("pre_ln_input")
        return self.block_loss(2, self.pre_ln(u), target) + self.a_layer * kl_moments(m, v, m2[1:], v2[1:])

    def sample_input(self, i: int, batch: int, generator: torch.Generator, size: int | None = None) -> torch.Tensor:
        """Random start for block i's input: N(stored mean, stored var) per token / position / channel.

        Pixels (block 0) have no stored statistics: N(0, 1), the scale of processor-normalised
        pixels. `size` asks for a coarse patch map (per-position moments average-pooled to that
        grid). ``i = -1``: the tokens entering the pre-layernorm ("pre_ln_input" statistics)."""
        shape = self.blocks.input_shape(2 if i == -1 else i)
        key = "pre_ln_input" if i == -1 else self.input_key(i)
        if key is None:
            noise = torch.randn(batch, *shape, generator=generator)
            return noise.to(self.device, self.dtype)
        mean, var = (t.cpu().float() for t in self.moments(key))
        if i == 1:
            size = size or self.blocks.grid
            shape = (shape[0], size, size)
            if key == "patch_channel":
                mean, var = mean.view(1, -1, 1, 1), var.view(1, -1, 1, 1)
            else:
                g = self.blocks.grid
                mean, var = mean.view(1, 1, g, g), var.view(1, 1, g, g)
                if size != g:
                    mean, var = F.adaptive_avg_pool2d(mean, size), F.adaptive_avg_pool2d(var, size)
        else:
            mean, var = mean.view(1, -1, 1), var.view(1, -1, 1)
        noise = torch.randn(batch, *shape, generator=generator)
        return (mean + var.sqrt() * noise).to(self.device, self.dtype)

    @torch.no_grad()
    def variance_ratio(self, i: int, z: torch.Tensor) -> dict[str, float]:
        """Mean variance of a solved input of block i (per token / position / channel over the batch,
        as stored) next to the real data's at that block: the per-layer diagnostic of inversion-notes.md."""
        key = self.input_key(i)
        _, var = token_moments(z.flatten(2) if key == "patch_channel" else z)
        real = self.moments(key)[1]
        return {"solved": var.mean().item(), "real": real.mean().item()}

    def to_image(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] at any size -> processor-normalised pixels at the model's image size."""
        mean = torch.tensor(CLIP_MEAN, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)
        return (upsample(pixels01, self.blocks.embeddings.image_size) - mean) / std

