"""Letters in many styles and colours: an offline world of up to 26 classes for training a BatchNorm
network from scratch (the ResNet path of issue 22).

`hf_pmi.testing.letters` draws grey 8x8 letters for pre-training a CLIP; this world is harder and
richer, so that a small ResNet trained from scratch has something to learn and to forget. A class
is a letter (``"a"`` .. ``"z"``); every image draws, independently:

- a **face**: Pillow's scalable default font, its bitmap default font (blocky when enlarged), or
  either of them hollow (outline only), bold (thick stroke), slanted (sheared) or condensed/wide;
- upper or lower case (``i`` always lower, ``l`` always upper: ``I`` and ``l`` look alike), the glyph's size, position and rotation;
- foreground and background colours (at least 0.35 apart in grey level, either may be the darker),
  a colour gradient or speckle noise on the background, and (in 3 images of 10) a slight blur.

How hard: a ResNet-32 (`hf_pmi.resnet`) trained from scratch on 20 letters x 300 images at 16 px
(SGD, one-cycle lr 0.1, 20 epochs, shifts of up to 2 px) reaches 0.98 test accuracy (50 images per
letter, another seed), in about 250 s on one CPU thread; it sits at chance for the first ~5 epochs
while it learns to ignore colour and polarity.

Only fonts that ship with Pillow are used, so the world is the same on every machine with the same
Pillow version. Rendered at 4x the image size and reduced with a box filter.

Example:
    >>> images, labels = font_letters_images(per_class=2, num_classes=3, image_size=16)
    >>> images.shape, images.dtype, labels.tolist()
    ((6, 16, 16, 3), dtype('uint8'), [0, 0, 1, 1, 2, 2])
"""

from __future__ import annotations

import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"
FACES = ("regular", "bitmap", "hollow", "bold", "slanted", "condensed", "wide")
SUPERSAMPLE = 4  # render at 4x, reduce with a box filter: smooth edges at 16-32 px
MIN_CONTRAST = 0.35  # grey-level gap between letter and background: legible at 16 px
# Upper-case I and lower-case l are the same glyph in a sans-serif face: these letters keep one case.
FIXED_CASE = {"i": "lower", "l": "upper"}


def _colour(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = rng.uniform(0, 1, size=3)
    return c, float(c @ np.array([0.299, 0.587, 0.114]))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB in [0, 1] whose grey levels differ by >= MIN_CONTRAST."""
    while True:
        (fg, gf), (bg, gb) = _colour(rng), _colour(rng)
        if abs(gf - gb) >= MIN_CONTRAST:
            return fg, bg


def _glyph_mask(char: str, face: str, size: int, rng: np.random.Generator):
    """A greyscale ``size x size`` mask (PIL image, 255 = ink) of one glyph in one face."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    centre = (size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size)
    if face == "bitmap":  # a small bitmap font, drawn at its own size then enlarged: blocky strokes
        small = Image.new("L", (16, 16), 0)
        ImageDraw.Draw(small).text((2, 2), char, fill=255, font=ImageFont.load_default_imagefont())  # no anchors here
        box = small.getbbox() or (0, 0, 16, 16)
        glyph = small.crop(box)
        scale = rng.uniform(0.55, 0.75) * size / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.NEAREST)
        canvas.paste(glyph, (round(centre[0] - glyph.width / 2), round(centre[1] - glyph.height / 2)))
    else:
        font = ImageFont.load_default(size=max(4, int(rng.uniform(0.6, 0.85) * size)))
        unit = size / 64  # stroke widths in 1/64 of the image
        if face == "hollow":
            draw.text(centre, char, fill=0, font=font, anchor="mm", stroke_width=max(1, round(2 * unit)), stroke_fill=255)
        else:
            stroke = round(rng.uniform(2.5, 4.5) * unit) if face == "bold" else round(rng.uniform(0, 1.5) * unit)
            draw.text(centre, char, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    if face == "slanted":  # shear x by up to +-0.4 around the centre
        k = rng.choice([-1, 1]) * rng.uniform(0.2, 0.4)
        canvas = canvas.transform(canvas.size, Image.AFFINE, (1, k, -k * size / 2, 0, 1, 0), resample=Image.BILINEAR)
    elif face in ("condensed", "wide"):  # squeeze or stretch x around the centre
        s = rng.uniform(1.3, 1.6) if face == "condensed" else rng.uniform(0.65, 0.8)
        canvas = canvas.transform(canvas.size, Image.AFFINE, (s, 0, size / 2 * (1 - s), 0, 1, 0), resample=Image.BILINEAR)
    return canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)


def _background(rng: np.random.Generator, bg: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) background: flat, a linear gradient or speckle noise around `bg`."""
    base = np.broadcast_to(bg, (size, size, 3)).astype(np.float32)
    kind = rng.integers(3)
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1) - 0.5
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        base = base + 0.25 * ramp * rng.choice([-1, 1])
    elif kind == 2:
        base = base + rng.normal(0, 0.06, size=(size, size, 1)).astype(np.float32)
    return base


def render_letter(char: str, face: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One letter as a uint8 RGB array ``(image_size, image_size, 3)`` (see the module docstring)."""
    from PIL import Image, ImageFilter

    if face not in FACES:
        raise ValueError(f"face must be one of {FACES}, got {face!r}.")
    size = image_size * SUPERSAMPLE
    upper = rng.random() < 0.5
    upper = {"lower": False, "upper": True}.get(FIXED_CASE.get(char.lower(), ""), upper)
    text = char.upper() if upper else char.lower()
    mask = _glyph_mask(text, face, size, rng)
    if rng.random() < 0.3:  # a slight blur of 0.25 .. 0.6 output pixels
        mask = mask.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.25, 0.6)) * SUPERSAMPLE))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    fg, bg = _colours(rng)
    pixels = alpha * fg.astype(np.float32) + (1 - alpha) * _background(rng, bg, size)
    pixels = pixels.clip(0, 1).reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return (pixels * 255).round().astype(np.uint8)


def font_letters_images(per_class: int, num_classes: int = 20, image_size: int = 32, seed: int = 1234,
                        faces: tuple[str, ...] = FACES):
    """``per_class`` images of each of the first `num_classes` letters, faces drawn uniformly from
    `faces`. Returns uint8 RGB arrays ``(N, S, S, 3)`` and int64 labels (0 = "a"), class-major."""
    if not 1 <= num_classes <= len(LETTERS):
        raise ValueError(f"num_classes must be in 1..{len(LETTERS)}, got {num_classes}.")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(num_classes):
        for _ in range(per_class):
            images.append(render_letter(LETTERS[label], faces[rng.integers(len(faces))], image_size, rng))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def load_font_letters_dataset(num_classes: int = 20, image_size: int = 32, train_per_class: int = 200,
                              test_per_class: int = 50, seed: int = 1234):
    """The world as a `DatasetDict` ("train"/"test", columns "image" and a `ClassLabel` "label" named
    "a" .. ); test images come from another seed, so no image is in both splits."""
    from datasets import DatasetDict

    from .digits import images_to_dataset

    names = list(LETTERS[:num_classes])
    return DatasetDict(
        train=images_to_dataset(*font_letters_images(train_per_class, num_classes, image_size, seed), names),
        test=images_to_dataset(*font_letters_images(test_per_class, num_classes, image_size, seed + 1), names),
    )
