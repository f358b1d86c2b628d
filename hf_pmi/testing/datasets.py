"""What every offline world shares: uint8 RGB arrays -> a `datasets.Dataset`, and digit-style upscaling.

Example:
    >>> import numpy as np
    >>> ds = images_to_dataset(np.zeros((2, 4, 4, 3), np.uint8), [0, 1], ["a", "b"])
    >>> ds.features["label"].names, ds[1]["image"].size
    (['a', 'b'], (4, 4))
"""

from __future__ import annotations

import numpy as np


def upscale_to_rgb(x, image_size: int) -> np.ndarray:
    """(N, 1, h, w) grey values in [0, 1] -> (N, image_size, image_size, 3) uint8 (bilinear)."""
    import torch

    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()


def images_to_dataset(images: np.ndarray, labels, names: list[str]):
    """uint8 RGB arrays and integer labels -> a `Dataset` with an "image" column and a `ClassLabel` "label"."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(a) for a in images], "label": [int(y) for y in labels]}, features=features
    )
