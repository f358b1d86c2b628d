"""Look at replayed samples: patch maps back to images through the patch embedding's pseudo-inverse.

The patch embedding is a linear map from ``C * p * p`` pixel values of a patch to ``D`` hidden
values (a stride-p conv). With ``D >= C * p * p`` (768 >= 3*16*16 for ViT-B/16) its pseudo-inverse
recovers the pixels that produce the part of a patch map lying in its range; then the processor's
normalisation is undone.

Example:
    >>> import torch
    >>> from hf_pmi.blocks import VisionBlocks
    >>> from hf_pmi.testing import build_clip
    >>> from hf_pmi.visualize import patch_maps_to_images
    >>> model = build_clip("tiny")
    >>> pixels = torch.rand(2, 3, 32, 32)
    >>> images = patch_maps_to_images(model, VisionBlocks(model).patch_embed(pixels), [0, 0, 0], [1, 1, 1])
    >>> images.shape, images.dtype
    ((2, 32, 32, 3), dtype('uint8'))
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .blocks import VisionBlocks


@torch.no_grad()
def patch_maps_to_pixels(model: nn.Module, patch_maps: torch.Tensor) -> torch.Tensor:
    """Processor-normalised pixels ``(B, C, H, W)`` whose patch embedding is closest to `patch_maps`."""
    conv = VisionBlocks(model).embeddings.patch_embedding
    d, c, p, _ = conv.weight.shape
    weight = conv.weight.reshape(d, c * p * p).double()
    pinv = torch.linalg.pinv(weight)  # (C*p*p, D)
    b, _, g, _ = patch_maps.shape
    y = patch_maps.double().flatten(2).transpose(1, 2)  # (B, g*g, D)
    if conv.bias is not None:
        y = y - conv.bias.double()
    x = y @ pinv.T  # (B, g*g, C*p*p)
    x = x.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)
    return x.float()


def patch_maps_to_images(
    model: nn.Module, patch_maps: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]
) -> np.ndarray:
    """uint8 RGB images ``(B, H, W, 3)`` from patch maps ``(B, D, g, g)``.

    `image_mean` / `image_std` are the processor's (``processor.image_processor.image_mean`` / ``.image_std``).
    """
    x = patch_maps_to_pixels(model, patch_maps.detach().cpu() if patch_maps.device.type != "cpu" else patch_maps)
    mean = torch.tensor(image_mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(image_std, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x * std + mean).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(
    images: np.ndarray, labels: Sequence[int], class_names: Sequence[str] | None, path: str | os.PathLike, columns: int | None = None
) -> None:
    """One PNG with the images in a grid, each titled with its class name (or label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        raise ValueError("save_image_grid got no images.")
    columns = columns or min(n, 10)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels):
        ax.imshow(image)
        label = int(label)
        ax.set_title(class_names[label] if class_names is not None else str(label), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
