"""A procedural shapes world with compositional captions: the world of `hf_pmi.testing.backbones.shapes_clip`,
a small CLIP pre-trained on it with the CLIP objective, text tower included, so that class names carry
meaning offline.

Images are 8 shapes x 8 colours drawn at a random size (small or large), place, rotation and fill
texture (solid, striped or dotted) on a noisy dark background; captions read "a small red
triangle", "a large blue ring" or "a green star". `HELD_OUT` (16 of the 64 shape-colour pairs, two per
shape and two per colour) never appears in pre-training: zero-shot accuracy on them measures whether
the text tower composes colour and shape words it has only seen apart.

Example:
    >>> from hf_pmi.testing.shapes import HELD_OUT, load_shapes_dataset
    >>> len(HELD_OUT), HELD_OUT[0]
    (16, 'red triangle')
    >>> data = load_shapes_dataset(per_class=2, test_per_class=1)
    >>> data["train"].features["label"].names[:2], data["train"][0]["image"].size
    (['red triangle', 'red star'], (32, 32))
"""

from __future__ import annotations

import math

import numpy as np

from .datasets import images_to_dataset

SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "half circle"]
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 220, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (40, 210, 220),
}
COLOUR_NAMES = list(COLOURS)
SIZES = ["small", "large"]
# Prompt templates the captions make meaningful; a class name is "<colour> <shape>".
SHAPES_TEMPLATES = ["a {}", "a small {}", "a large {}"]


def _held_out() -> list[str]:
    """Two shapes per colour and two colours per shape (a cyclic Latin pattern), never seen in pre-training."""
    pairs = []
    for c in range(len(COLOUR_NAMES)):
        for offset in (2, 4):  # colour c pairs with shapes c+2 and c+4 (mod 8)
            pairs.append(f"{COLOUR_NAMES[c]} {SHAPES[(c + offset) % len(SHAPES)]}")
    return pairs


HELD_OUT = _held_out()
ALL_CLASSES = [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]
SEEN = [name for name in ALL_CLASSES if name not in HELD_OUT]


def _shape_mask(shape: str, size: float, cx: float, cy: float, angle: float, canvas: int):
    """A boolean (canvas, canvas) mask of one shape of radius `size` centred at (cx, cy), rotated by `angle`."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (canvas, canvas), 0)
    d = ImageDraw.Draw(img)

    def poly(points):
        rot = [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
               for x, y in points]
        d.polygon(rot, fill=255)

    r = size
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        q = 0.55 * r  # hole: a ring reads as a ring down to the small size
        d.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    elif shape == "square":
        s = 0.85 * r
        poly([(-s, -s), (s, -s), (s, s), (-s, s)])
    elif shape == "diamond":
        poly([(0, -r), (0.65 * r, 0), (0, r), (-0.65 * r, 0)])
    elif shape == "triangle":
        poly([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    elif shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        poly(pts)
    elif shape == "cross":
        w = 0.33 * r
        poly([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
              (-w, -w)])
    elif shape == "half circle":
        poly([(r * math.cos(a), r * math.sin(a) + 0.35 * r) for a in np.linspace(math.pi, 2 * math.pi, 16)])
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")
    return np.asarray(img) > 127


def render_shapes(classes: list[str], sizes: list[str], rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """uint8 RGB images (N, image_size, image_size, 3), one per (class name, size word) pair."""
    canvas = 2 * image_size  # drawn at twice the size and averaged down: smooth edges
    out = np.empty((len(classes), image_size, image_size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:canvas, 0:canvas]
    for n, (name, size_word) in enumerate(zip(classes, sizes)):
        colour_name, shape = name.split(" ", 1)
        radius = canvas * (rng.uniform(0.13, 0.19) if size_word == "small" else rng.uniform(0.28, 0.36))
        margin = radius + 1
        cx, cy = rng.uniform(margin, canvas - margin, size=2)
        mask = _shape_mask(shape, radius, cx, cy, rng.uniform(-0.35, 0.35), canvas)
        background = rng.uniform(10, 70) + rng.normal(0, rng.uniform(2, 14), size=(canvas, canvas))
        img = np.repeat(background[..., None], 3, axis=2)
        colour = np.array(COLOURS[colour_name], dtype=np.float64) * rng.uniform(0.85, 1.1)
        fill = np.ones((canvas, canvas))
        texture = rng.integers(3)  # 0 solid, 1 striped, 2 dotted
        if texture == 1:
            period, phase = rng.integers(5, 9), rng.uniform(0, 2 * math.pi)
            fill = 0.7 + 0.3 * (np.sin(2 * math.pi * (xx + yy) / period + phase) > 0)
        elif texture == 2:
            period = rng.integers(5, 9)
            fill = np.where(((xx // period) + (yy // period)) % 2 == 0, 1.0, 0.75)
        img[mask] = (colour[None, :] * fill[mask][:, None]) + rng.normal(0, 6, size=(int(mask.sum()), 3))
        img = img.clip(0, 255).reshape(image_size, 2, image_size, 2, 3).mean(axis=(1, 3))
        out[n] = img.round().astype(np.uint8)
    return out


def shapes_images(classes: list[str], per_class: int, image_size: int = 32, seed: int = 0):
    """`per_class` images of each class (random size word each), as uint8 RGB arrays, labels
    (index into `classes`) and the size words."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), per_class)
    sizes = [SIZES[i] for i in rng.integers(2, size=len(labels))]
    return render_shapes([classes[y] for y in labels], sizes, rng, image_size), labels, sizes


def load_shapes_dataset(classes: list[str] | None = None, per_class: int = 60, test_per_class: int = 30,
                        image_size: int = 32, seed: int = 0):
    """Shapes as a `DatasetDict` ("train"/"test") with an "image" column and a `ClassLabel` "label"
    whose names ("red triangle", ...) are the CLIP class names.

    `classes` defaults to `HELD_OUT`: the pairs the pre-trained `shapes_clip` never saw, so a
    continual run on them learns new concepts.
    """
    from datasets import DatasetDict

    classes = list(HELD_OUT if classes is None else classes)
    unknown = [c for c in classes if c not in ALL_CLASSES]
    if unknown:
        raise ValueError(f"Unknown shape classes {unknown}; class names are '<colour> <shape>' from {COLOUR_NAMES} x {SHAPES}.")
    train_x, train_y, _ = shapes_images(classes, per_class, image_size, seed)
    test_x, test_y, _ = shapes_images(classes, test_per_class, image_size, seed + 10_000)
    return DatasetDict(train=images_to_dataset(train_x, train_y, classes),
                       test=images_to_dataset(test_x, test_y, classes))
