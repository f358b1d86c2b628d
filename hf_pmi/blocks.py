"""The CLIP vision tower cut into the blocks that per-layer inversion (PMI) walks through.

Block indices follow `method.md`: ``0`` patch embedding (conv) -> patch map ``(B, D, g, g)``;
``1`` "pre": flatten, prepend the class token, add positions, pre-layernorm -> ``(B, N, D)``;
``2 .. L+1`` the L encoder layers; ``L+2`` "post": post-layernorm on the CLS token and the visual
projection -> un-normalised image features ``(B, P)``.

Replay samples are patch maps (the input of block 1), so the same object serves inversion and the
replay forward pass of the trainer.

Example:
    >>> import torch
    >>> from hf_pmi.blocks import VisionBlocks
    >>> from hf_pmi.testing import build_clip
    >>> blocks = VisionBlocks(build_clip("tiny"))
    >>> x = torch.rand(2, 3, 32, 32)
    >>> patch_map = blocks.patch_embed(x)
    >>> torch.allclose(blocks.forward_from(1, patch_map), blocks.features(x), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap_clip(model: nn.Module) -> nn.Module:
    """The `CLIPModel` inside a `ContinualCLIP`, a peft `PeftModel` or DDP wrapper (LoRA layers stay)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if "vision_model" in model._modules and "visual_projection" in model._modules:  # not via __getattr__
            return model
        for attr in ("module", "clip", "base_model", "model"):
            inner = model._modules.get(attr)
            if isinstance(inner, nn.Module):
                model = inner
                break
    raise TypeError(f"Could not find a CLIPModel inside {type(model).__name__}.")


class VisionBlocks:
    """Callable view of a CLIP vision tower as a chain of blocks (holds references, no copies)."""

    def __init__(self, model: nn.Module):
        clip = unwrap_clip(model)
        vision = clip.vision_model
        self.embeddings = vision.embeddings
        self.pre_layrnorm = vision.pre_layrnorm
        self.layers = vision.encoder.layers
        self.post_layernorm = vision.post_layernorm
        self.visual_projection = clip.visual_projection
        self.num_layers = len(self.layers)
        self.num_blocks = self.num_layers + 3
        self.hidden_size = self.embeddings.embed_dim
        self.grid = self.embeddings.image_size // self.embeddings.patch_size
        self.num_tokens = self.grid * self.grid + 1

    # ----- single blocks -------------------------------------------------------------------
    def patch_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Block 0: pixels (B, 3, H, W) -> patch map (B, D, g, g)."""
        conv = self.embeddings.patch_embedding
        return conv(pixel_values.to(conv.weight.dtype))

    def pre(self, patch_map: torch.Tensor) -> torch.Tensor:
        """Block 1: patch map (B, D, g, g) -> tokens (B, N, D) after the pre-layernorm."""
        tokens = patch_map.flatten(2).transpose(1, 2)
        cls = self.embeddings.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.embeddings.position_embedding.weight[None]
        return self.pre_layrnorm(tokens)

    def post(self, hidden: torch.Tensor) -> torch.Tensor:
        """Block L+2: tokens (B, N, D) -> un-normalised image features (B, P)."""
        return self.visual_projection(self.post_layernorm(hidden[:, 0]))

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Run block `i` alone on its input `x`."""
        if i == 0:
            return self.patch_embed(x)
        if i == 1:
            return self.pre(x)
        if i == self.num_blocks - 1:
            return self.post(x)
        return self.layers[i - 2](x, None)

    def forward_from(self, start: int, x: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. end-1`` (default: to the image features) on the input of `start`."""
        end = self.num_blocks if end is None else end
        for i in range(start, end):
            x = self.block(i, x)
        return x

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Un-normalised image features of pixels (the same as `CLIPModel.get_image_features`)."""
        return self.forward_from(0, pixel_values)

    def input_shape(self, i: int) -> tuple[int, ...]:
        """Shape of one sample entering block `i` (without the batch dimension)."""
        if i == 0:
            size = self.embeddings.image_size
            return (self.embeddings.patch_embedding.in_channels, size, size)
        if i == 1:
            return (self.hidden_size, self.grid, self.grid)
        return (self.num_tokens, self.hidden_size)

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        """The parameters block `i` computes with (LoRA weights of a peft layer included)."""
        if i == 0:
            return list(self.embeddings.patch_embedding.parameters())
        if i == 1:
            return [self.embeddings.class_embedding, *self.embeddings.position_embedding.parameters(),
                    *self.pre_layrnorm.parameters()]
        if i == self.num_blocks - 1:
            return [*self.post_layernorm.parameters(), *self.visual_projection.parameters()]
        return list(self.layers[i - 2].parameters())

    def block_costs(self) -> list[float]:
        """Relative forward cost of each block (fractions summing to 1), from its multiply-adds.

        A per-layer inversion step on block i counts as ``costs[i]`` full-model passes.
        """
        d, n, g = self.hidden_size, self.num_tokens, self.grid
        conv = self.embeddings.patch_embedding
        patch = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * d * g * g
        inter = self.layers[0].mlp.fc1.out_features
        layer = n * (4 * d * d + 2 * d * inter) + 2 * n * n * d  # q,k,v,o + MLP + attention
        pre = n * d * 4  # add + layernorm: elementwise
        post = d * self.visual_projection.out_features + d * 4
        flops = [patch, pre] + [layer] * self.num_layers + [post]
        total = float(sum(flops))
        return [f / total for f in flops]


def layers_below_pattern(block: int) -> str | None:
    r"""A regex of the CLIP vision encoder layers below vision block `block` (layers 0 .. block - 3), for
    peft's ``LoraConfig(exclude_modules=...)``: LoRA then adapts nothing that replay at `block` skips.
    None when no encoder layer lies below (block <= 2).

    Example:
        >>> layers_below_pattern(4)
        '.*vision_model\\.encoder\\.layers\\.(?:0|1)\\..*'
        >>> layers_below_pattern(2) is None
        True
    """
    if block <= 2:
        return None
    return r".*vision_model\.encoder\.layers\.(?:" + "|".join(str(i) for i in range(block - 2)) + r")\..*"
