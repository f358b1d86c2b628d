"""Per-layer model inversion (PMI) and full-model refinement (method.md, steps 5-6).

Given target image features (sampled from the feature bank), PMI walks the vision tower
backwards, one block at a time (`per_layer`): the input of block ``i`` is optimised so that the
block maps it onto the solution found for block ``i + 1`` while its activation statistics stay
close to the stored ones (`objective`). One step on block ``i`` costs only that block's share of a
full forward/backward. The whole tower is then refined (`refinement`). ``mode="full"`` is the
DeepInversion-style baseline: the refinement alone, from a random start, by default with the same
budget in full-model passes (`report` explains the cost accounting). ``mode="refresh"`` refines
given inputs (earlier samples, under a model that has since changed) with the refinement's settings.

Example:
    >>> import torch
    >>> from hf_pmi.inversion import InversionConfig, invert
    >>> from hf_pmi.statistics import collect_layer_statistics
    >>> from hf_pmi.testing import build_clip
    >>> model = build_clip("tiny")
    >>> stats = collect_layer_statistics(model, [torch.randn(16, 3, 32, 32)])
    >>> config = InversionConfig(layer_steps=5, first_block_steps=8, upsample_at=(2, 4, 6), refine_steps=5)
    >>> result = invert(model, torch.randn(4, 16), stats, config, progress=False)
    >>> tuple(result.samples.shape), len(result.report["curve"])
    ((4, 32, 8, 8), 5)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..blocks import VisionBlocks
from ..statistics import LayerStatistics, eval_mode
from .config import MODES, PRESETS, REFERENCE_PRESET, InversionConfig, check_mode
from .objective import Objective, feature_mse, frozen_parameters, total_variation
from .optim import Tracker
from .per_layer import passes_per_chunk, per_layer_stage
from .refinement import random_pixels, random_start, refine
from .report import merge_chunks


@dataclass
class InversionResult:
    """``samples``: inputs of ``config.start_block`` (patch maps ``(B, D, g, g)`` for block 1);
    ``report``: steps, costs, timings and the loss curve (see `invert`)."""

    samples: torch.Tensor
    report: dict[str, Any]


def full_steps(blocks: VisionBlocks, config: InversionConfig) -> int:
    """Steps of a random start: ``config.full_steps``, or the passes of one per-layer batch (equal budget)."""
    return config.full_steps if config.full_steps is not None else round(passes_per_chunk(blocks, config))


def _invert_chunk(obj: Objective, targets: torch.Tensor, config: InversionConfig, mode: str, generator,
                  progress: bool, init: torch.Tensor | None = None):
    """One per-layer batch: samples, [(size, loss, curve)] per refinement chunk, the tracker and the
    (passes, seconds) spent before the refinement."""
    blocks, start = obj.blocks, config.start_block
    refine_chunks = math.ceil(targets.shape[0] / (config.refine_batch_size or targets.shape[0]))
    if mode == "pmi":
        total = sum(config.first_block_steps if i == 1 else config.layer_steps for i in range(start, blocks.num_blocks))
        total += config.refine_steps * refine_chunks
    elif mode == "refresh":
        total = config.refine_steps * refine_chunks
    else:
        total = full_steps(blocks, config)
    tracker = Tracker(total, progress, desc=f"inversion ({mode})")
    try:
        if mode in ("pmi", "refresh"):
            x0 = init if mode == "refresh" else per_layer_stage(obj, targets, config, generator, tracker)
            before = (tracker.passes, tracker.seconds)
            x, chunks = refine(obj, x0, targets, config, tracker, start, sum(blocks.block_costs()[start:]))
            return x, chunks, tracker, before
        fn = random_pixels if config.full_space == "pixel" else random_start
        x, chunks = fn(obj, targets, config, total, generator, tracker)
        return x, chunks, tracker, (0.0, 0.0)
    finally:
        tracker.close()


def invert(
    model: nn.Module,
    targets: torch.Tensor,
    stats: LayerStatistics,
    config: InversionConfig | None = None,
    *,
    mode: str = "pmi",
    seed: int | None = None,
    init: torch.Tensor | None = None,
    progress: bool = True,
) -> InversionResult:
    """Invert target image features ``(B, P)`` to inputs of ``config.start_block``.

    ``mode="pmi"``: blocks from the last one down to ``start_block`` are inverted one at a time
    (each from a sample of its stored input moments; block 1 coarse-to-fine), then the whole tower is
    refined. ``mode="full"``: the refinement alone, from a random start (patch maps or, with
    ``full_space="pixel"``, the reference's pixel path), for ``full_steps(blocks, config)`` steps.
    ``mode="refresh"``: the refinement alone (``config.refine_steps``), from `init` (inputs of
    ``config.start_block``, one per target).
    Targets are processed in per-layer chunks of ``config.batch_size``, refined in chunks of
    ``config.refine_batch_size``. Random starts are drawn from `seed` (default ``config.seed``, else
    0). The model is put in eval mode and its parameters get no gradients; both are restored afterwards.

    The report holds: ``mode``, ``start_block``, ``num_targets``, ``num_chunks``, ``steps`` (per
    stage and chunk: ``block{i}``, ``refine`` (per refinement chunk) or ``full``), ``stage_passes``,
    ``stage_seconds``, ``stage_loss`` (best loss of each stage's own objective, mean over chunks),
    ``block_variance`` (per block of the per-layer stage: mean variance of its solved input,
    ``solved``, and of the real input, ``real``, by the stored statistics), ``start_loss`` (the
    full-model objective of the refinement's start, mode "pmi"), ``full_model_passes``
    (`hf_pmi.inversion.report`), ``seconds``, ``final_loss`` (the refinement objective of the
    returned samples, mean over chunks weighted by size), ``final_feature_mse`` and ``curve``:
    ``(passes, seconds, loss)`` at every refinement step (every step in mode "full"), passes and
    seconds cumulated over all chunks brought to that step (per-layer stages included), loss their
    weighted mean.
    """
    config = config or InversionConfig()
    config.validate()
    check_mode(mode)
    if (mode == "refresh") != (init is not None):
        raise ValueError("Pass `init` (the inputs to refine) with mode='refresh', and only then.")
    if init is not None and init.shape[0] != targets.shape[0]:
        raise ValueError(f"init holds {init.shape[0]} inputs for {targets.shape[0]} targets: give one per target.")
    blocks = VisionBlocks(model)
    if not 0 <= config.start_block < blocks.num_blocks - 1:
        raise ValueError(f"start_block must be in 0..{blocks.num_blocks - 2}, got {config.start_block}.")
    if targets.dim() != 2 or targets.shape[1] != blocks.visual_projection.out_features:
        raise ValueError(
            f"targets must be (B, {blocks.visual_projection.out_features}) image features, got {tuple(targets.shape)}."
        )
    weight = blocks.embeddings.patch_embedding.weight
    device, dtype = weight.device, weight.dtype
    obj = Objective(blocks, stats, config, device, dtype)
    seed = seed if seed is not None else (config.seed if config.seed is not None else 0)
    generator = torch.Generator().manual_seed(seed)
    targets = targets.detach().to(device, dtype)
    samples, chunks, trackers, befores = [], [], [], []
    t0 = time.perf_counter()
    inits = init.detach().to(device, dtype).split(config.batch_size) if init is not None else None
    with eval_mode(model), frozen_parameters(model), torch.enable_grad():
        for j, chunk in enumerate(targets.split(config.batch_size)):
            x, refined, tracker, before = _invert_chunk(obj, chunk, config, mode, generator, progress,
                                                        None if inits is None else inits[j])
            samples.append(x)
            chunks.append(refined)
            trackers.append(tracker)
            befores.append(before)
        samples = torch.cat(samples)
        with torch.no_grad():
            out = torch.cat([blocks.forward_from(config.start_block, s) for s in samples.split(config.batch_size)])
            final_mse = feature_mse(out, targets, config.normalize_features).item()
    seconds = time.perf_counter() - t0
    report = {"mode": mode, "start_block": config.start_block,
              **merge_chunks(chunks, trackers, befores, targets.shape[0], per_layer=mode == "pmi"),
              "seconds": seconds, "final_feature_mse": final_mse}
    return InversionResult(samples=samples, report=report)


__all__ = [
    "MODES", "PRESETS", "REFERENCE_PRESET", "InversionConfig", "InversionResult", "Objective", "full_steps", "invert",
    "passes_per_chunk", "total_variation",
]
