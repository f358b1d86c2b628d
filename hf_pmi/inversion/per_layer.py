"""The per-layer stage (method.md step 5): blocks from the last one down to ``start_block``, one at a time.

Each block's input is optimised, from a sample of its stored input moments, so that the block maps
it onto the solution found for the block above (the target feature for the last block) while its
activation statistics stay close to the stored ones; block 1 (the patch map) coarse-to-fine.
`passes_per_chunk` is what one per-layer batch costs, stage and refinement together, in full-model
passes: the budget a random start gets for a fair comparison.

Example:
    >>> from hf_pmi.blocks import VisionBlocks
    >>> from hf_pmi.testing import build_clip
    >>> blocks = VisionBlocks(build_clip("tiny"))
    >>> round(passes_per_chunk(blocks, InversionConfig(layer_steps=10, first_block_steps=20, upsample_at=[5],
    ...                                                 refine_steps=10)), 2)
    19.16
"""

from __future__ import annotations

import math

import torch

from ..blocks import VisionBlocks
from .config import InversionConfig
from .objective import Objective, upsample
from .optim import adam_loop, coarse_to_fine


def passes_per_chunk(blocks: VisionBlocks, config: InversionConfig) -> float:
    """Full-model-equivalent passes of one per-layer batch (per-layer stage + refinement), by block costs."""
    costs = blocks.block_costs()
    last = blocks.num_blocks - 1
    per_layer = sum(config.layer_steps * costs[i] for i in range(config.start_block + 1, last + 1))
    first = config.first_block_steps * costs[config.start_block]
    refine_chunks = math.ceil(config.batch_size / (config.refine_batch_size or config.batch_size))
    return per_layer + first + refine_chunks * config.refine_steps * sum(costs[config.start_block:])


def per_layer_stage(obj: Objective, targets, config: InversionConfig, generator, tracker):
    """The per-layer stage: blocks from the post block down to ``start_block``, one at a time."""
    blocks, costs = obj.blocks, obj.blocks.block_costs()
    start, last = config.start_block, blocks.num_blocks - 1
    keep_layers = config.keep_best in ("all", "layers")
    z_next = targets
    for i in range(last, start - 1, -1):
        target_i = z_next.detach()
        if i == 1:
            g = blocks.grid
            coarse = obj.sample_input(1, target_i.shape[0], generator, size=min(config.coarse_size, g))
            z_next, _ = coarse_to_fine(
                lambda v, t=target_i: obj.block_loss(1, upsample(v, g), t, coarse=v), coarse, g, config.first_block_steps,
                config.upsample_at, config.layer_lr, tracker, "block1", costs[1], config.keep_best == "all",
            )
            z_next = upsample(z_next, g).detach()
        elif i == 2 and start <= 1 and config.first_layer_in_ln_range:
            u, _ = adam_loop(
                lambda v, t=target_i: obj.first_layer_loss(v, t), obj.sample_input(-1, target_i.shape[0], generator),
                config.layer_steps, config.layer_lr, tracker, "block2", costs[1] + costs[2], keep_layers,
            )
            with torch.no_grad():
                z_next = obj.pre_ln(u)
        else:
            z_next, _ = adam_loop(
                lambda v, i=i, t=target_i: obj.block_loss(i, v, t), obj.sample_input(i, target_i.shape[0], generator),
                config.layer_steps, config.layer_lr, tracker, f"block{i}", costs[i], keep_layers,
            )
        if obj.input_key(i) is not None:  # pixels have no stored statistics to compare with
            tracker.block_variance[f"block{i}"] = obj.variance_ratio(i, z_next)
    return z_next

