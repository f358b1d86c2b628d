"""`to_rgb`: any decoded image -> an 8-bit RGB `PIL.Image`, keeping its contrast.

PIL's own ``convert("RGB")`` clips float and 16-bit images into 0..255: a float image in [0, 1]
turns black and a 16-bit image (0..65535) white. Here their values are rescaled first.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32))).getpixel((0, 0))
    (128, 128, 128)
    >>> to_rgb(Image.fromarray(np.full((2, 2), 65535, np.uint16))).getpixel((0, 0))
    (255, 255, 255)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT = 65535.0  # the maximum of a 16-bit sample
_EIGHT_BIT = 255.0


def to_rgb(image) -> Image.Image:
    """An 8-bit RGB image; float ("F") and 16/32-bit integer ("I", "I;16*") images are rescaled.

    Floats are read as [0, 1] when none exceeds 1, else as 0..255; integers as 16-bit when the mode
    says so or any value exceeds 255. Non-finite pixels raise `ValueError` (no value can stand for them).
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.mode not in ("F", "I") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    x = np.asarray(image, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(
            f"An image ({image.mode}, {image.size[0]}x{image.size[1]}) holds {int((~np.isfinite(x)).sum())} "
            f"non-finite pixel value(s) (NaN or inf). Repair or drop it from the dataset before training."
        )
    if image.mode == "F":
        scale = _EIGHT_BIT if x.size and x.max() <= 1.0 else 1.0
    else:
        scale = _EIGHT_BIT / _SIXTEEN_BIT if image.mode.startswith("I;16") or (x.size and x.max() > _EIGHT_BIT) else 1.0
    grey = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
