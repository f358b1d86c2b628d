"""Rendered letters a-z in the style of the digits: the pre-training world of the digits demo's
backbone (`hf_pmi.testing.backbones.letters_clip`). Letters are not digits, so nothing of the
continual digits tasks leaks into that pre-training.

Example:
    >>> data = load_letters_dataset(train_per_class=1, test_per_class=1)
    >>> data["train"].features["label"].names[:2], len(data["train"])
    (['letter a', 'letter b'], 26)
"""

from __future__ import annotations

import numpy as np

from .datasets import images_to_dataset, upscale_to_rgb

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letters_images(per_class: int, image_size: int = 32, seed: int = 1234):
    """Letters a-z drawn with Pillow's built-in font (upper or lower case; random size, place,
    stroke width and tilt), reduced to 8x8 with 17 grey levels like scikit-learn's digits and
    upscaled as `digits_images` does. Returns uint8 RGB arrays and labels (0 = "a")."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, char in enumerate(LETTERS):
        for _ in range(per_class):
            canvas = Image.new("L", (40, 40), 0)
            font = ImageFont.load_default(size=int(rng.integers(18, 30)))  # glyphs of 1/2 .. 3/4 of the image
            text = char.upper() if rng.random() < 0.5 else char
            xy = (20 + int(rng.integers(-4, 5)), 20 + int(rng.integers(-4, 5)))
            stroke = int(rng.integers(1, 3))
            ImageDraw.Draw(canvas).text(xy, text, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
            canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR).crop((4, 4, 36, 36))
            x = torch.tensor(np.asarray(canvas), dtype=torch.float32)[None, None] / 255
            x = (torch.nn.functional.adaptive_avg_pool2d(x, 8) * 16).round()  # digits: 8x8, values 0..16
            images.append(x[0])
            labels.append(label)
    return upscale_to_rgb(torch.stack(images) / 16.0, image_size), np.array(labels, dtype=np.int64)


def load_letters_dataset(image_size: int = 32, train_per_class: int = 100, test_per_class: int = 20, seed: int = 1234):
    """Rendered letters (`letters_images`) as a `DatasetDict` like `load_digits_dataset`; classes
    are named "letter a" ... "letter z"."""
    from datasets import DatasetDict

    names = [f"letter {c}" for c in LETTERS]
    return DatasetDict(
        train=images_to_dataset(*letters_images(train_per_class, image_size, seed), names),
        test=images_to_dataset(*letters_images(test_per_class, image_size, seed + 1), names),
    )
