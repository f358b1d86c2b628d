"""The replay buffer: targets drawn from the feature bank, inverted to samples (method.md, step 7).

`synthesize_replay` draws ``sampling.per_class`` targets for every class asked for (CFS or plain
Gaussian samples; a generator per class seeded from ``(seed, class id)`` only) and inverts them
(`hf_pmi.inversion.invert`). With several processes the classes are sharded round-robin, each
process inverts its shard, and the results are gathered so that every process returns the whole
buffer, ordered as the class ids. Deterministic for a given seed and number of processes.

Example:
    >>> import torch
    >>> from hf_pmi.bank import FeatureBank, SamplingConfig
    >>> from hf_pmi.inversion import InversionConfig
    >>> from hf_pmi.statistics import collect_layer_statistics
    >>> from hf_pmi.testing import build_clip
    >>> model = build_clip("tiny")
    >>> bank = FeatureBank()
    >>> bank.add_classes([0, 1], {0: torch.randn(8, 16), 1: torch.randn(8, 16)}, train_contrastive=False)
    >>> bank.update_statistics(collect_layer_statistics(model, [torch.randn(8, 3, 32, 32)]))
    >>> inversion = InversionConfig(layer_steps=2, first_block_steps=2, upsample_at=[1], refine_steps=2)
    >>> x, y, _ = synthesize_replay(model, bank, [0, 1], inversion, SamplingConfig(per_class=2, selection="gaussian"),
    ...                             progress=False)
    >>> tuple(x.shape), y.tolist()
    ((4, 32, 8, 8), [0, 0, 1, 1])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .bank import FeatureBank, SamplingConfig
from .blocks import VisionBlocks
from .contrastive import SelectionConfig
from .inversion import InversionConfig, invert
from .seeding import class_seed, rank_seed


def class_generator(seed: int, class_id: int) -> torch.Generator:
    """The generator of one class's targets: depends on (seed, class id) only, not on sharding."""
    return torch.Generator().manual_seed(class_seed(seed, class_id))


def synthesize_replay(
    model: nn.Module,
    bank: FeatureBank,
    class_ids,
    inversion: InversionConfig | None = None,
    sampling: SamplingConfig | None = None,
    selection: SelectionConfig | None = None,
    *,
    mode: str = "pmi",
    seed: int | None = None,
    accelerator=None,
    progress: bool = True,
):
    """Replay buffer: ``sampling.per_class`` inverted samples for every class in `class_ids` (module docstring).

    `seed` (default ``inversion.seed``, else 0) seeds the targets of every class and, shifted per
    process (`hf_pmi.seeding.rank_seed`), the random starts. Returns ``(samples, labels, report)``;
    `report` is this process's `invert` report plus ``classes`` (the classes it inverted) and
    ``num_processes``.
    """
    inversion = inversion or InversionConfig()
    sampling = sampling or SamplingConfig()
    selection = selection or SelectionConfig()
    seed = seed if seed is not None else (inversion.seed if inversion.seed is not None else 0)
    if bank.statistics is None:
        raise ValueError("The feature bank has no layer statistics: call bank.update_statistics(collect_layer_statistics(...)) first.")
    class_ids = [int(c) for c in class_ids]
    if not class_ids:
        raise ValueError("synthesize_replay needs at least one class id.")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = class_ids[rank::world]
    blocks = VisionBlocks(model)
    device = blocks.embeddings.patch_embedding.weight.device
    per_class = sampling.per_class
    if mine:
        targets = torch.cat([
            bank.sample_class(c, per_class, class_generator(seed, c), sampling.selection, **selection.sample_kwargs())
            for c in mine
        ])
        result = invert(model, targets, bank.statistics, inversion, mode=mode, seed=rank_seed(seed, rank),
                        progress=progress)
        samples, report = result.samples, result.report
    else:  # more processes than classes
        samples = torch.empty(0, *blocks.input_shape(inversion.start_block), device=device)
        report = {"full_model_passes": 0.0, "seconds": 0.0, "curve": []}
    labels = torch.tensor(mine, dtype=torch.int64, device=device).repeat_interleave(per_class)
    report = {**report, "classes": mine, "num_processes": world}
    if world > 1:
        per_process = math.ceil(len(class_ids) / world) * per_class
        pad = per_process - samples.shape[0]
        samples = torch.cat([samples, samples.new_zeros(pad, *samples.shape[1:])]).to(accelerator.device)
        labels = torch.cat([labels, labels.new_full((pad,), -1)]).to(accelerator.device)
        samples, labels = accelerator.gather(samples.contiguous()), accelerator.gather(labels.contiguous())
        keep = labels >= 0
        samples, labels = samples[keep], labels[keep]
    order = {c: j for j, c in enumerate(class_ids)}
    perm = sorted(range(labels.shape[0]), key=lambda j: order[int(labels[j])])  # stable: keeps per-class order
    perm = torch.tensor(perm, dtype=torch.long, device=labels.device)
    return samples[perm], labels[perm], report
