"""scikit-learn's handwritten digits (1797 images, 8x8, 10 classes) as a `datasets.DatasetDict`.

Example:
    >>> from hf_pmi.testing import load_digits_dataset
    >>> data = load_digits_dataset()
    >>> data["train"].features["label"].names[:3], data["train"][0]["image"].size
    (['zero', 'one', 'two'], (32, 32))
"""

from __future__ import annotations

import numpy as np

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def upscale_to_rgb(x, image_size: int) -> np.ndarray:
    """(N, 1, h, w) grey values in [0, 1] -> (N, image_size, image_size, 3) uint8 (bilinear)."""
    import torch

    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()


def digits_images(image_size: int = 32):
    """scikit-learn's 1797 digits as uint8 RGB arrays of `image_size` (bilinear upscale), and labels."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # pixel values are 0..16
    return upscale_to_rgb(x, image_size), digits.target.astype(np.int64)


def images_to_dataset(images: np.ndarray, labels, names: list[str]):
    """uint8 RGB arrays and integer labels -> a `Dataset` with an "image" column and a `ClassLabel` "label"."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(a) for a in images], "label": [int(y) for y in labels]}, features=features
    )


def load_digits_dataset(image_size: int = 32, test_size: float = 0.3, seed: int = 0):
    """Digits as a `DatasetDict` ("train"/"test", stratified) with columns "image" and "label".

    The label column is a `ClassLabel` with names "zero" ... "nine", so the class names reach the
    text classifier like those of any Hub dataset.
    """
    from datasets import DatasetDict
    from sklearn.model_selection import train_test_split

    images, labels = digits_images(image_size)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels
    )
    return DatasetDict(
        train=images_to_dataset(images[idx_train], labels[idx_train], DIGIT_NAMES),
        test=images_to_dataset(images[idx_test], labels[idx_test], DIGIT_NAMES),
    )
