"""Full-model stages (method.md step 6): the refinement of the per-layer result, and the random starts
of the DeepInversion-style baseline (patch maps from stored moments, or the reference's pixels).

Each returns the samples and, per refinement chunk, ``(size, loss, curve)`` with ``curve`` the
``(passes, seconds, loss)`` of every step relative to the stage's start.
"""

from __future__ import annotations

import torch

from .config import InversionConfig
from .objective import REFERENCE_PIXEL_START, Objective
from .optim import adam_loop, coarse_to_fine


def refine(obj: Objective, x0, targets, config: InversionConfig, tracker, start: int, cost: float):
    """Full-model refinement of the per-layer result in chunks of ``refine_batch_size``. Returns the
    samples, per chunk (size, loss, curve) with curves relative to the refinement's start."""
    size = config.refine_batch_size or x0.shape[0]
    out, chunks = [], []
    keep = config.keep_best == "all"
    t_max = config.refine_t_max or config.refine_steps
    for x, t in zip(x0.split(size), targets.split(size)):
        mark, curve = (tracker.passes, tracker.seconds), []
        x, loss = adam_loop(lambda v, t=t: obj.full_loss(start, v, t), x, config.refine_steps, config.refine_lr,
                             tracker, "refine", cost, keep, t_max, curve)
        if config.refine_steps == 0:  # nothing refined: report the loss of the per-layer result itself
            with torch.no_grad():
                loss = obj.full_loss(start, x, t).item()
        out.append(x)
        chunks.append((t.shape[0], loss, [(p - mark[0], s - mark[1], v) for p, s, v in curve]))
    return torch.cat(out), chunks



def random_start(obj: Objective, targets, config: InversionConfig, steps: int, generator, tracker):
    """Full-model steps from a sample of the stored input moments of ``start_block`` (mode "full", patch space)."""
    start = config.start_block
    x0 = obj.sample_input(start, targets.shape[0], generator)
    curve: list = []
    x, loss = adam_loop(lambda v: obj.full_loss(start, v, targets), x0, steps, config.full_lr, tracker, "full",
                        sum(obj.blocks.block_costs()[start:]), config.keep_best == "all", config.full_t_max or steps,
                        curve)
    return x, [(targets.shape[0], loss, curve)]


def random_pixels(obj: Objective, targets, config: InversionConfig, steps: int, generator, tracker):
    """The reference's full-model path: pixels in [0, 1] from uniform noise at a coarse size,
    up-sampled before each forward, doubled at `upsample_at`, clamped after each step."""
    size = obj.blocks.embeddings.image_size
    coarse = max(2, round(size * REFERENCE_PIXEL_START))
    x = torch.rand(targets.shape[0], 3, coarse, coarse, generator=generator).to(obj.device, obj.dtype)
    curve: list = []
    x, loss = coarse_to_fine(
        lambda v: obj.full_loss(0, obj.to_image(v), targets, tv_input=v), x, size, steps, config.upsample_at,
        config.full_lr, tracker, "full", 1.0, config.keep_best == "all", config.full_t_max or steps,
        curve, project=lambda v: v.clamp(0, 1),
    )
    with torch.no_grad():
        x = obj.to_image(x)
        if config.start_block == 1:  # replay enters after the (frozen, exact) patch embedding
            x = obj.blocks.patch_embed(x)
    return x, [(targets.shape[0], loss, curve)]

