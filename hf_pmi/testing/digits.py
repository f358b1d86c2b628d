"""scikit-learn's handwritten digits (1797 images, 8x8, 10 classes) as a `datasets.DatasetDict`.

Example:
    >>> from hf_pmi.testing import load_digits_dataset
    >>> data = load_digits_dataset()
    >>> data["train"].features["label"].names[:3], data["train"][0]["image"].size
    (['zero', 'one', 'two'], (32, 32))
"""

from __future__ import annotations

import numpy as np

from .datasets import images_to_dataset, upscale_to_rgb

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_images(image_size: int = 32):
    """scikit-learn's 1797 digits as uint8 RGB arrays of `image_size` (bilinear upscale), and labels."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # pixel values are 0..16
    return upscale_to_rgb(x, image_size), digits.target.astype(np.int64)


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
