"""The offline pre-trained backbones: small CLIPs trained once on an offline world and cached.

They stand in for the pre-trained CLIP the method is made for (a model trained from scratch one
task at a time is a different and much harder regime, docs/benchmarks.md):

- `letters_clip`: vision tower and text projection trained on rendered letters
  (`hf_pmi.testing.letters`), the backbone of the digits demo;
- `shapes_clip`: both towers trained with the CLIP objective on the shapes world
  (`hf_pmi.testing.shapes`), so that class names carry meaning offline.

With their default arguments (the demos' backbones) both ship with hf_pmi, made by this module's
pre-training functions (``python -m hf_pmi.testing.backbones --export letters`` / ``--export shapes``;
the files, their sha256 and that command are in ``hf_pmi/testing/pretrained/SHIPPED.json``): they
load at once, sha256 verified: the same weights on every machine. Any other configuration
is pre-trained by a function of this module the first time it is asked for and then loaded from the
cache (`hf_pmi.testing.cache`). Run ``python -m hf_pmi.testing.backbones`` to load (or pre-train) the
shapes CLIP and print its zero-shot accuracies.

Example (pre-training logs go to stderr, so doctest skips it):
    >>> import tempfile
    >>> clip = letters_clip("tiny", cache_dir=tempfile.mkdtemp(), epochs=1, per_class=4)  # doctest: +SKIP
    >>> clip.config._name_or_path  # doctest: +SKIP
    ''
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..log import get_logger
from .cache import cached_pretrained
from .clip import build_clip, build_clip_config, build_processor
from .letters import load_letters_dataset
from .shapes import ALL_CLASSES, HELD_OUT, SEEN, SHAPES_TEMPLATES, SIZES, render_shapes, shapes_images


# ----- letters ------------------------------------------------------------------------------------
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
        f"letters-clip-{size}", "hf_pmi.testing.backbones:pretrain_letters_clip", cache_dir,
        size=size, seed=seed, epochs=float(epochs), per_class=per_class, image_size=image_size,
    )


def pretrain_letters_clip(folder: str, size: str, seed: int, epochs: float, per_class: int, image_size: int) -> None:
    """Train the letters CLIP (see `letters_clip`) and save it to `folder`."""
    import contextlib
    import io
    import os
    import tempfile

    from ..config import ContinualConfig
    from ..data import split_class_incremental
    from ..modeling import ContinualCLIP
    from ..trainer import ContinualTrainer

    get_logger().warning("Pre-training the %s letters CLIP (%g epochs on 26 x %d rendered letters).", size, epochs,
                         per_class)
    clip = build_clip(size, seed=seed, image_size=image_size)
    clip.text_model.requires_grad_(False)
    tasks = split_class_incremental(load_letters_dataset(image_size, train_per_class=per_class), num_tasks=1, seed=None)
    with tempfile.TemporaryDirectory() as work:
        args = ContinualConfig(
            output_dir=os.path.join(work, "run"), method="finetune", num_train_epochs=epochs,
            per_device_train_batch_size=64, warmup_steps=20, seed=seed, logging_steps=10**9,  # progress bar, no log lines
        )
        model = ContinualCLIP.from_clip(clip, templates=["{}"])
        trainer = ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=build_processor(image_size))
        with contextlib.redirect_stdout(io.StringIO()):  # its task lines would read as the user's run
            trainer.train()
    clip.save_pretrained(folder)


# ----- shapes -------------------------------------------------------------------------------------
# 4 layers per tower instead of "small"'s 8: pre-training stays within minutes on one CPU thread
# (a step of 128 pairs costs ~0.5 s there vs ~1.1 s with 8 layers).
SHAPES_LAYERS = 4
# 2000 steps: 500 left shapes confused (zero-shot on held-out pairs 0.575 among 16 names, seen pairs
# 0.288 among 64); 2000 reach 0.886 and 0.908 (docs/names_only.md), ~20 min on one CPU thread, once.
PRETRAIN_STEPS = 2000


def shapes_clip_config(image_size: int = 32):
    """The shapes CLIP's config: the "small" geometry of `CLIP_SIZES` with `SHAPES_LAYERS` layers per tower."""
    config = build_clip_config("small", image_size=image_size)
    config.vision_config.num_hidden_layers = SHAPES_LAYERS
    config.text_config.num_hidden_layers = SHAPES_LAYERS
    return config


def shapes_clip(cache_dir: str | None = None, seed: int = 0, steps: int = PRETRAIN_STEPS, image_size: int = 32):
    """A small `CLIPModel` ("small" geometry: hidden 48, patch 4, so 3·4² = 48 >= 48; 4 layers per tower)
    pre-trained on the shapes world with the CLIP objective, both towers trained, `HELD_OUT`
    pairs never shown. Cached (see `hf_pmi.testing.cache`); the first call trains it (measured
    time and accuracies: docs/benchmarks.md, or ``python -m hf_pmi.testing.backbones``)."""
    return cached_pretrained("shapes-clip-small", "hf_pmi.testing.backbones:pretrain_shapes_clip", cache_dir,
                             seed=seed, steps=steps, image_size=image_size)


def _normalise(images: np.ndarray, processor):
    """uint8 (N, H, W, 3) -> pixel values exactly as the CLIP image processor makes them (no resize needed)."""
    import torch

    ip = processor.image_processor
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    return (x - mean) / std


def pretrain_shapes_clip(folder: str, seed: int, steps: int, image_size: int) -> None:
    """Train the shapes CLIP (see `shapes_clip`) and save it to `folder`.

    Symmetric contrastive loss over a batch of 128 image-caption pairs; captions that are equal in
    a batch are all positives of each other (the soft target spreads over them), since 96 seen
    captions repeat within a batch. AdamW lr 2e-3 (a small model from scratch), 50 warm-up steps,
    cosine decay; a fresh batch of images is rendered every step, so no image is seen twice.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import CLIPModel, get_cosine_schedule_with_warmup

    get_logger().warning("Pre-training the shapes CLIP (%d steps of 128 rendered image-caption pairs).", steps)
    torch.manual_seed(seed)
    config = shapes_clip_config(image_size)
    clip = CLIPModel(config).train()
    processor = build_processor(image_size)
    captions = [f"a {s} {c}" for c in SEEN for s in SIZES] + [f"a {c}" for c in SEEN]
    enc = processor.tokenizer(captions, padding="max_length", truncation=True,
                              max_length=config.text_config.max_position_embeddings, return_tensors="pt")
    opt = torch.optim.AdamW(clip.parameters(), lr=2e-3, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, 50, steps)
    rng = np.random.default_rng(seed)
    batch = 128  # 48 seen pairs x 3 caption forms = 144 captions: a batch covers most of them
    for _ in tqdm(range(steps), desc="shapes CLIP", mininterval=5):
        pairs = rng.integers(len(SEEN), size=batch)
        sizes = rng.integers(2, size=batch)
        with_size = rng.random(batch) < 0.5  # half the captions name the size
        images = render_shapes([SEEN[p] for p in pairs], [SIZES[s] for s in sizes], rng, image_size)
        cap = np.where(with_size, pairs * 2 + sizes, 2 * len(SEEN) + pairs)
        img = F.normalize(clip.get_image_features(pixel_values=_normalise(images, processor)).pooler_output, dim=-1)
        ids = torch.from_numpy(cap)
        txt = F.normalize(clip.get_text_features(input_ids=enc.input_ids[ids],
                                                 attention_mask=enc.attention_mask[ids]).pooler_output, dim=-1)
        logits = clip.logit_scale.exp() * img @ txt.t()
        # positives: the same shape-colour pair (the size word is a detail an image shows too, but a
        # caption without it fits every size)
        same = torch.from_numpy(pairs[:, None] == pairs[None, :]).float()
        size_ok = torch.from_numpy((sizes[:, None] == sizes[None, :]) | ~with_size[None, :] | ~with_size[:, None]).float()
        target = same * size_ok
        target = target / target.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target.t() * F.log_softmax(logits.t(), 1), 1).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
    clip.eval().save_pretrained(folder)


def zero_shot_accuracy(clip, classes: list[str], per_class: int = 50, candidates: list[str] | None = None,
                       image_size: int = 32, seed: int = 777) -> float:
    """Accuracy of classifying rendered images of `classes` by name among `candidates` (default: the
    classes themselves), with the text prototype of each name averaged over `SHAPES_TEMPLATES`."""
    import torch
    import torch.nn.functional as F

    candidates = list(classes if candidates is None else candidates)
    processor = build_processor(image_size)
    images, labels, _ = shapes_images(classes, per_class, image_size, seed)
    truth = torch.tensor([candidates.index(classes[y]) for y in labels])
    length = clip.config.text_config.max_position_embeddings
    texts = [t.format(c) for c in candidates for t in SHAPES_TEMPLATES]
    enc = processor.tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    with torch.no_grad():
        txt = F.normalize(clip.get_text_features(**enc).pooler_output, dim=-1)
        txt = F.normalize(txt.view(len(candidates), len(SHAPES_TEMPLATES), -1).mean(1), dim=-1)
        img = F.normalize(clip.get_image_features(pixel_values=_normalise(images, processor)).pooler_output, dim=-1)
    return float(((img @ txt.t()).argmax(1) == truth).float().mean())


EXPORTS = {  # what `--export` ships: the demos' default backbones
    "letters": lambda: dict(name="letters-clip-mini", train="hf_pmi.testing.backbones:pretrain_letters_clip",
                            description="mini letters CLIP", size="mini", seed=0, epochs=float(LETTERS_EPOCHS["mini"]),
                            per_class=100, image_size=32),
    "shapes": lambda: dict(name="shapes-clip-small", train="hf_pmi.testing.backbones:pretrain_shapes_clip",
                           description="shapes CLIP", seed=0, steps=PRETRAIN_STEPS, image_size=32),
}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Pre-train (once, cached) the shapes CLIP and report its zero-shot accuracy; or, with --export, "
                    "pre-train a demo backbone afresh and ship it in hf_pmi/testing/pretrained/ (weights, sha256, "
                    "this command).")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", choices=sorted(EXPORTS), default=None,
                        help="Pre-train this backbone with its default arguments and ship it.")
    a = parser.parse_args(argv)
    if a.export:
        import shlex
        import sys

        from .cache import export_pretrained

        spec = EXPORTS[a.export]()
        command = shlex.join(["python", "-m", "hf_pmi.testing.backbones", "--export", a.export])
        t0 = time.time()
        entry = export_pretrained(spec.pop("name"), spec.pop("train"), spec.pop("description"), command, **spec)
        print(f"shipped {entry['name']}: {entry['bytes']} bytes, sha256 {entry['sha256']} ({time.time() - t0:.0f} s)",
              file=sys.stderr)
        return
    t0 = time.time()
    clip = shapes_clip(a.cache_dir, seed=a.seed, steps=a.steps)
    print(f"load (and pre-train if not cached): {time.time() - t0:.0f} s")
    print(f"zero-shot, held-out pairs among the 16 held-out names: {zero_shot_accuracy(clip, HELD_OUT):.3f} (chance {1 / 16:.3f})")
    print(f"zero-shot, held-out pairs among all 64 names:          {zero_shot_accuracy(clip, HELD_OUT, candidates=ALL_CLASSES):.3f} (chance {1 / 64:.3f})")
    print(f"seen pairs among all 64 names:                        {zero_shot_accuracy(clip, SEEN, candidates=ALL_CLASSES):.3f}")


if __name__ == "__main__":
    main()
