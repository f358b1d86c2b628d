"""Small, offline building blocks shared by the demo recipe, the tests and the benchmarks.

Everything here is built locally in well under a second: a CLIP model from a config, a byte-level
CLIP tokenizer (no merges, so it needs no download), an image processor, and scikit-learn's
handwritten digits as a `datasets.DatasetDict` of 32x32 RGB images with class names.

Example:
    >>> from hf_pmi.testing import build_clip, build_processor, load_digits_dataset
    >>> model = build_clip("tiny")
    >>> processor = build_processor(model.config.vision_config.image_size)
    >>> data = load_digits_dataset()
    >>> data["train"].features["label"].names[:3]
    ['zero', 'one', 'two']
"""

from __future__ import annotations

import numpy as np

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Sizes of CLIP built from a config. "tiny" is for unit tests (a forward+backward of 64 images
# costs ~0.01 s per layer here), "mini" is the demo default: big enough to reach ~0.9 on digits
# when trained jointly, small enough for a 5-task run in a few minutes on 2 CPU cores.
CLIP_SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=4, projection=16),
    "mini": dict(hidden=128, layers=4, heads=4, projection=64),
}
VOCAB_SIZE = 514  # 256 byte symbols, their "</w>" forms, start and end tokens


def byte_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary that can spell any text with no merges: one token per byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_tokenizer():
    """A working `CLIPTokenizer` built offline (byte-level vocab, empty merges)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_vocab(), merges=[])


def build_clip_config(size: str = "tiny", image_size: int = 32, patch_size: int = 4, max_text_length: int = 32):
    """A `CLIPConfig` for a small CLIP (see `CLIP_SIZES`), with token ids inside the byte vocab."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    if size not in CLIP_SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(CLIP_SIZES)}.")
    s = CLIP_SIZES[size]
    common = dict(
        hidden_size=s["hidden"],
        intermediate_size=4 * s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        projection_dim=s["projection"],
    )
    vocab = byte_vocab()
    text = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=max_text_length,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **common,
    )
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **common)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=s["projection"])


def build_clip(size: str = "tiny", seed: int = 0, **kwargs):
    """A randomly initialised `CLIPModel` of the given size (deterministic for a seed)."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(build_clip_config(size, **kwargs)).eval()


def build_processor(image_size: int = 32, max_text_length: int = 32):
    """A `CLIPProcessor` with the byte-level tokenizer and a PIL image processor at `image_size`."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = max_text_length
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def digits_images(image_size: int = 32):
    """scikit-learn's 1797 digits as uint8 RGB arrays of `image_size` (bilinear upscale), and labels."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # pixel values are 0..16
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1)
    return x.numpy(), digits.target.astype(np.int64)


def load_digits_dataset(image_size: int = 32, test_size: float = 0.3, seed: int = 0):
    """Digits as a `DatasetDict` ("train"/"test", stratified) with columns "image" and "label".

    The label column is a `ClassLabel` with names "zero" ... "nine", so the class names reach the
    text classifier like those of any Hub dataset.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from sklearn.model_selection import train_test_split

    images, labels = digits_images(image_size)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels
    )
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})

    def make(idx):
        return Dataset.from_dict(
            {"image": [PILImage.fromarray(images[i]) for i in idx], "label": labels[idx].tolist()},
            features=features,
        )

    return DatasetDict(train=make(idx_train), test=make(idx_test))
