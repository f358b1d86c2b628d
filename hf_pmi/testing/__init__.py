"""Offline worlds for the demo recipes, the tests and the benchmarks; not part of the library's data flow.

Everything here is built locally: small CLIP models from configs with a byte-level tokenizer
(`clip`); one module per data world: scikit-learn's digits (`digits`), rendered letters
(`letters`), a procedural shapes world with captions (`shapes`), with their shared dataset helper
(`datasets`); the CLIPs pre-trained on those worlds (`backbones`), and `cache`, which loads the
demos' backbones shipped in ``pretrained/`` (sha256 verified) and pre-trains any other once.

Example:
    >>> from hf_pmi.testing import build_clip, build_processor, load_digits_dataset
    >>> model = build_clip("tiny")
    >>> processor = build_processor(model.config.vision_config.image_size)
    >>> data = load_digits_dataset()
    >>> data["train"].features["label"].names[:3]
    ['zero', 'one', 'two']
"""

from .cache import cached_pretrained
from .clip import CLIP_SIZES, build_clip, build_clip_config, build_processor, build_tokenizer, byte_vocab
from .datasets import images_to_dataset
from .digits import DIGIT_NAMES, digits_images, load_digits_dataset
from .letters import LETTERS, letters_images, load_letters_dataset
from .shapes import HELD_OUT, SHAPES_TEMPLATES, load_shapes_dataset

__all__ = [
    "CLIP_SIZES", "DIGIT_NAMES", "HELD_OUT", "LETTERS", "SHAPES_TEMPLATES", "build_clip", "build_clip_config",
    "build_processor", "build_tokenizer", "byte_vocab", "cached_pretrained", "digits_images", "images_to_dataset",
    "letters_clip", "letters_images", "load_digits_dataset", "load_letters_dataset", "load_shapes_dataset",
    "shapes_clip",
]


def __getattr__(name: str):
    """`letters_clip` and `shapes_clip`, imported on first use (so that ``python -m hf_pmi.testing.backbones``
    runs that module once, as __main__)."""
    if name in ("letters_clip", "shapes_clip"):
        from . import backbones

        return getattr(backbones, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
