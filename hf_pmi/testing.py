"""Small, offline building blocks shared by the demo recipe, the tests and the benchmarks.

Everything here is built locally: a CLIP model from a config, a byte-level CLIP tokenizer (no
merges, so it needs no download), an image processor, scikit-learn's handwritten digits as a
`datasets.DatasetDict` of 32x32 RGB images with class names, rendered letters in the same style,
and `letters_clip`: a small CLIP pre-trained on those letters (minutes, then cached), the offline
stand-in for the pre-trained CLIP the method is made for.

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

LETTERS = "abcdefghijklmnopqrstuvwxyz"
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
    return _upscale_to_rgb(x, image_size), digits.target.astype(np.int64)


def _upscale_to_rgb(x, image_size: int) -> np.ndarray:
    """(N, 1, 8, 8) grey values in [0, 1] -> (N, image_size, image_size, 3) uint8 (bilinear)."""
    import torch

    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()


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
    return _upscale_to_rgb(torch.stack(images) / 16.0, image_size), np.array(labels, dtype=np.int64)


def load_letters_dataset(image_size: int = 32, train_per_class: int = 100, test_per_class: int = 20, seed: int = 1234):
    """Rendered letters (`letters_images`) as a `DatasetDict` like `load_digits_dataset`; classes
    are named "letter a" ... "letter z"."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": ClassLabel(names=[f"letter {c}" for c in LETTERS])})

    def make(per_class, split_seed):
        images, labels = letters_images(per_class, image_size, split_seed)
        return Dataset.from_dict(
            {"image": [PILImage.fromarray(a) for a in images], "label": labels.tolist()}, features=features
        )

    return DatasetDict(train=make(train_per_class, seed), test=make(test_per_class, seed + 1))


def letters_clip(size: str = "mini", cache_dir: str | None = None, seed: int = 0, epochs: float = 12,
                 per_class: int = 100, image_size: int = 32):
    """A small `CLIPModel` pre-trained on rendered letters: the offline stand-in for a pre-trained CLIP.

    The method adapts a pre-trained CLIP with adapters; a model trained from scratch one task at a
    time is a different and much harder regime (see docs/benchmarks.md). Letters are not digits,
    so nothing of the continual tasks leaks into this pre-training. The vision tower and the text
    projection are trained (the random text tower stays frozen: trained whole from scratch it pulls
    the class prompts together and stalls) with the classifier of `ContinualCLIP`, all 26 classes
    in one task, AdamW lr 1e-3, batch 64. On the mini size, 12 epochs reach 0.74 accuracy on
    held-out letters (chance 0.04) in ~125 s on 2 CPU cores; the tiny size 0.21 in ~25 s.

    The result is saved (safetensors) to a folder of `cache_dir` (default ``$HF_PMI_CACHE`` or
    ``~/.cache/hf_pmi``) named after the arguments and reloaded from there on later calls. A file
    lock makes concurrent callers (processes of one launch, parallel benchmark runs) train it once; under a distributed launch the training runs in
    a separate single process, since the launch's own processes would wait for each other. The
    returned model has an empty ``name_or_path``: a cache folder is no home a checkpoint or a Hub
    repo could point to, so checkpoints built on it keep its weights.

    Example (training logs go to stdout, so doctest skips it):
        >>> import tempfile
        >>> clip = letters_clip("tiny", cache_dir=tempfile.mkdtemp(), epochs=1, per_class=4)  # doctest: +SKIP
        >>> clip.config._name_or_path  # doctest: +SKIP
        ''
    """
    import os
    import subprocess
    import sys

    from filelock import FileLock
    from transformers import CLIPModel

    cache_dir = cache_dir or os.environ.get("HF_PMI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_pmi")
    folder = os.path.join(cache_dir, f"letters-clip-{size}-{image_size}px-{per_class}pc-seed{seed}-e{epochs:g}")
    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(folder + ".lock"):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            args = (size, folder, seed, epochs, per_class, image_size)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("TORCHELASTIC_")}
                code = f"from hf_pmi.testing import _pretrain_letters_clip; _pretrain_letters_clip{args!r}"
                subprocess.run([sys.executable, "-c", code], env=env, check=True)
            else:
                _pretrain_letters_clip(*args)
        clip = CLIPModel.from_pretrained(folder)
    clip.config._name_or_path = ""
    clip.name_or_path = ""
    return clip.eval()


# What torchrun / accelerate launch set to make a process one rank of a group.
_LAUNCH_VARIABLES = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def _pretrain_letters_clip(size: str, folder: str, seed: int, epochs: float, per_class: int, image_size: int) -> None:
    """Train the letters CLIP (see `letters_clip`) and move it into `folder` in one rename, so that a
    crash leaves no half-written cache."""
    import os
    import tempfile

    from .config import ContinualConfig
    from .data import split_class_incremental
    from .modeling import ContinualCLIP
    from .trainer import ContinualTrainer

    clip = build_clip(size, seed=seed, image_size=image_size)
    clip.text_model.requires_grad_(False)
    tasks = split_class_incremental(load_letters_dataset(image_size, train_per_class=per_class), num_tasks=1, seed=None)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(folder)) as work:
        args = ContinualConfig(
            output_dir=os.path.join(work, "run"), method="finetune", num_train_epochs=epochs,
            per_device_train_batch_size=64, warmup_steps=20, seed=seed, disable_tqdm=True,
        )
        model = ContinualCLIP.from_clip(clip, templates=["{}"])
        ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=build_processor(image_size)).train()
        staging = os.path.join(work, "clip")
        clip.save_pretrained(staging)
        os.replace(staging, folder)
