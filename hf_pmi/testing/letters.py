"""Rendered letters a-z in the style of the digits, and `letters_clip`: a small CLIP pre-trained on
them, the offline stand-in for the pre-trained CLIP the method is made for.

Letters are not digits, so nothing of the continual digits tasks leaks into this pre-training.

Example (pre-training logs go to stderr, so doctest skips it):
    >>> import tempfile
    >>> clip = letters_clip("tiny", cache_dir=tempfile.mkdtemp(), epochs=1, per_class=4)  # doctest: +SKIP
    >>> clip.config._name_or_path  # doctest: +SKIP
    ''
"""

from __future__ import annotations

import numpy as np

from .cache import cached_pretrained
from .clip import build_clip, build_processor
from .digits import images_to_dataset, upscale_to_rgb

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


# Pre-training epochs per size: each reaches its plateau on held-out letters (docs/benchmarks.md).
LETTERS_EPOCHS = {"tiny": 12, "mini": 12, "small": 12}


def letters_clip(size: str = "mini", cache_dir: str | None = None, seed: int = 0, epochs: float | None = None,
                 per_class: int = 100, image_size: int = 32):
    """A small `CLIPModel` (a size of `CLIP_SIZES`) pre-trained on rendered letters, cached (see
    `hf_pmi.testing.cache`).

    The method adapts a pre-trained CLIP with adapters; a model trained from scratch one task at a
    time is a different and much harder regime (see docs/benchmarks.md). The vision tower and the
    text projection are trained (the random text tower stays frozen: trained whole from scratch it
    pulls the class prompts together and stalls) with the classifier of `ContinualCLIP`, all 26
    classes in one task, AdamW lr 1e-3, batch 64. On the mini size, 12 epochs reach 0.74 accuracy on
    held-out letters (chance 0.04) in ~125 s on 2 CPU cores; the tiny size 0.21 in ~25 s.
    """
    epochs = LETTERS_EPOCHS.get(size, 12) if epochs is None else epochs
    return cached_pretrained(
        f"letters-clip-{size}", "hf_pmi.testing.letters:pretrain_letters_clip", cache_dir,
        size=size, seed=seed, epochs=float(epochs), per_class=per_class, image_size=image_size,
    )


def pretrain_letters_clip(folder: str, size: str, seed: int, epochs: float, per_class: int, image_size: int) -> None:
    """Train the letters CLIP (see `letters_clip`) and save it to `folder`."""
    import logging
    import os
    import tempfile

    from ..config import ContinualConfig
    from ..data import split_class_incremental
    from ..modeling import ContinualCLIP
    from ..trainer import ContinualTrainer

    logging.getLogger("hf_pmi").warning(
        "Pre-training the %s letters CLIP once (%g epochs on 26 x %d rendered letters); it is cached in %s.",
        size, epochs, per_class, folder,
    )
    clip = build_clip(size, seed=seed, image_size=image_size)
    clip.text_model.requires_grad_(False)
    tasks = split_class_incremental(load_letters_dataset(image_size, train_per_class=per_class), num_tasks=1, seed=None)
    with tempfile.TemporaryDirectory() as work:
        args = ContinualConfig(
            output_dir=os.path.join(work, "run"), method="finetune", num_train_epochs=epochs,
            per_device_train_batch_size=64, warmup_steps=20, seed=seed, logging_steps=10**9,  # progress bar, no log lines
        )
        model = ContinualCLIP.from_clip(clip, templates=["{}"])
        ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=build_processor(image_size)).train()
    clip.save_pretrained(folder)
