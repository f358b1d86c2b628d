"""Offline worlds for the demo recipes, the tests and the benchmarks; not part of the library's data flow.

Everything here is built locally: small CLIP models from configs with a byte-level tokenizer
(`clip`), scikit-learn's digits (`digits`), rendered letters and a CLIP pre-trained on them
(`letters`), a procedural shapes world with captions and a CLIP pre-trained on it with the CLIP
objective, text tower included (`shapes`), and the cache that pre-trains such backbones once (`cache`).

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
from .digits import DIGIT_NAMES, digits_images, load_digits_dataset
from .letters import LETTERS, letters_clip, letters_images, load_letters_dataset
from .shapes import HELD_OUT, SHAPES_TEMPLATES, load_shapes_dataset, shapes_clip

__all__ = [
    "CLIP_SIZES", "DIGIT_NAMES", "HELD_OUT", "LETTERS", "SHAPES_TEMPLATES", "build_clip", "build_clip_config", "build_processor", "build_tokenizer",
    "byte_vocab", "cached_pretrained", "digits_images", "letters_clip", "letters_images", "load_digits_dataset",
    "load_letters_dataset", "load_shapes_dataset", "shapes_clip",
]
