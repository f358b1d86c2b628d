"""Small CLIP models, a byte-level tokenizer and an image processor, all built offline from configs.

Sizes (`CLIP_SIZES`) name a geometry: hidden size, encoder layers, heads, projection and the patch
size. Inversion replays patch-embedding maps, so a backbone that stands in for ViT-B/16 must keep
ViT-B/16's patch geometry: 3·p² pixel values per patch >= hidden size (768 -> 768 there). Below that
the patch embedding is under-complete, real patch maps live in a 3·p²-dimensional subspace and
inverted maps leave it (`is_complete_patch_embedding`).

Example:
    >>> from hf_pmi.testing import build_clip, build_processor
    >>> clip = build_clip("tiny")
    >>> clip.config.vision_config.hidden_size, build_processor().tokenizer("a b").input_ids
    (32, [512, 320, 321, 513])
"""

from __future__ import annotations

VOCAB_SIZE = 514  # 256 byte symbols, their "</w>" forms, start and end tokens

# "tiny" is for unit tests (a forward+backward of 64 images costs ~0.01 s per layer here); "mini" is
# the 4-layer backbone of the first digits protocol (patch embedding 48 -> 128: under-complete);
# "small" stands in for ViT-B/16 where inversion cares: a square patch embedding (3·4² = 48 -> 48, as
# 768 -> 768), 8 encoder layers of 65 tokens, still a few ms per layer on 2 CPU cores.
CLIP_SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=4, projection=16, patch=4),
    "mini": dict(hidden=128, layers=4, heads=4, projection=64, patch=4),
    "small": dict(hidden=48, layers=8, heads=4, projection=32, patch=4),
}


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


def build_clip_config(size: str = "tiny", image_size: int = 32, patch_size: int | None = None, max_text_length: int = 32):
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
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size or s["patch"], **common)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=s["projection"])


def build_clip(size: str = "tiny", seed: int = 0, **kwargs):
    """A randomly initialised `CLIPModel` of the given size (deterministic for a seed)."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(build_clip_config(size, **kwargs)).eval()


def is_complete_patch_embedding(config) -> bool:
    """True when the patch embedding maps at least as many pixel values as it has outputs (3·p² >= hidden)."""
    vision = getattr(config, "vision_config", config)
    return vision.num_channels * vision.patch_size**2 >= vision.hidden_size


def build_processor(image_size: int = 32, max_text_length: int = 32):
    """A `CLIPProcessor` with the byte-level tokenizer and a PIL image processor at `image_size`."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = max_text_length
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
