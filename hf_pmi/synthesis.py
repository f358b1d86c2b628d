"""The replay buffer: targets drawn from the feature bank, inverted to samples (method.md, step 7).

`synthesize_replay` draws ``sampling.per_class`` targets for every class asked for (CFS or plain
Gaussian samples; a generator per class seeded from ``(seed, class id)`` only), shuffles them across
classes (as the reference does: the statistics terms compare batch moments, so a batch should look
like the data, not like one class) and inverts them in batches (`hf_pmi.inversion.invert`). With
several processes the batches are dealt round-robin, each process inverts its share, and the results
are gathered so that every process returns the whole buffer, ordered by class. Deterministic for a
given seed and number of processes.

`BufferConfig` says how the buffer lives across tasks: each class inverted once, when it enters the
bank (``incremental``), its samples kept (optionally refined under each new model,
``refresh_steps``), stored in the checkpoint (`save_buffer` / `load_buffer`) in ``dtype``.

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
    >>> x, y, targets, _ = synthesize_replay(model, bank, [0, 1], inversion,
    ...                                      SamplingConfig(per_class=2, selection="gaussian"), progress=False)
    >>> tuple(x.shape), y.tolist(), tuple(targets.shape)
    ((4, 32, 8, 8), [0, 0, 1, 1], (4, 16))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from safetensors.torch import load_file
from torch import nn

from .bank import FeatureBank, SamplingConfig
from .blocks import VisionBlocks
from .contrastive import SelectionConfig
from .integrity import save_safetensors
from .inversion import InversionConfig, invert
from .seeding import class_seed, rank_seed, shuffle_seed
from .validation import ValidationError, require_count

BUFFER_NAME = "replay_buffer.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BufferConfig:
    """How the replay buffer is built and kept across tasks (flags ``--buffer_<field>``).

    Example:
        >>> BufferConfig().incremental, BufferConfig(incremental=False).refresh_steps
        (True, 0)
    """

    flag_prefix: ClassVar[str] = "buffer_"
    argument_group: ClassVar[str] = "replay buffer (BufferConfig)"

    incremental: bool = field(
        default=True,
        metadata={"help": "Invert each class once, when it enters the bank, and keep its samples for the rest of the "
                  "run and in the checkpoint. False: every class seen so far is inverted again after every task "
                  "(hf_pmi 0.1 and the reference; the work grows with the square of the number of tasks)."},
    )
    refresh_steps: int = field(
        default=0,
        metadata={"help": "Refinement steps the kept samples of old classes get under the model of each new task "
                  "(warm-started from their previous samples; 0: reused as they are)."},
    )
    shuffle: bool = field(
        default=True,
        metadata={"help": "Shuffle the targets of a synthesis across classes before cutting inversion batches (the "
                  "reference). False: batches are cut class by class."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": f"Precision the samples are kept and saved in: one of {sorted(DTYPES)}."},
    )

    def __post_init__(self):
        require_count(self.flag_prefix + "refresh_steps", self.refresh_steps, minimum=0,
                      meaning=" (0: kept samples are reused as they are)")
        if self.dtype not in DTYPES:
            raise ValidationError(f"{self.flag_prefix}dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")


def class_generator(seed: int, class_id: int) -> torch.Generator:
    """The generator of one class's targets: depends on (seed, class id) only, not on sharding."""
    return torch.Generator().manual_seed(class_seed(seed, class_id))


def inversion_batches(labels: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True) -> list[torch.Tensor]:
    """The positions of `labels` cut into inversion batches of `batch_size`: shuffled across classes
    (a permutation drawn from `seed`), or in order.

    Example:
        >>> batches = inversion_batches(torch.tensor([0, 0, 0, 1, 1, 1]), 3, seed=0)
        >>> sorted(torch.cat(batches).tolist()), [len(b) for b in batches]
        ([0, 1, 2, 3, 4, 5], [3, 3])
    """
    n = labels.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed(seed))) if shuffle else torch.arange(n)
    return list(order.split(batch_size))


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
    shuffle: bool = True,
    accelerator=None,
    progress: bool = True,
):
    """Replay samples: ``sampling.per_class`` inverted samples for every class in `class_ids` (module docstring).

    `seed` (default ``inversion.seed``, else 0) seeds the targets of every class, their shuffle and,
    shifted per process (`hf_pmi.seeding.rank_seed`), the random starts. Returns ``(samples, labels,
    targets, report)`` ordered by `class_ids`; `report` is this process's `invert` report plus
    ``classes``, ``targets`` (how many were inverted over all processes) and ``num_processes``.
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
    blocks = VisionBlocks(model)
    device = blocks.embeddings.patch_embedding.weight.device
    per_class = sampling.per_class
    targets = torch.cat([
        bank.sample_class(c, per_class, class_generator(seed, c), sampling.selection, **selection.sample_kwargs())
        for c in class_ids
    ])
    labels = torch.tensor(class_ids, dtype=torch.int64).repeat_interleave(per_class)
    n = labels.shape[0]
    batches = inversion_batches(labels, inversion.batch_size, seed, shuffle)
    mine = torch.cat(batches[rank::world]) if batches[rank::world] else labels[:0]
    if len(mine):
        result = invert(model, targets[mine], bank.statistics, inversion, mode=mode, seed=rank_seed(seed, rank),
                        progress=progress)
        samples, report = result.samples, result.report
    else:  # more processes than batches
        samples = torch.empty(0, *blocks.input_shape(inversion.start_block), device=device)
        report = {"full_model_passes": 0.0, "seconds": 0.0, "curve": []}
    report = {**report, "classes": class_ids, "targets": n, "num_processes": world}
    index = mine.to(device)
    if world > 1:
        per_process = math.ceil(len(batches) / world) * inversion.batch_size
        pad = per_process - samples.shape[0]
        samples = torch.cat([samples, samples.new_zeros(pad, *samples.shape[1:])]).to(accelerator.device)
        index = torch.cat([index, index.new_full((pad,), -1)]).to(accelerator.device)
        samples, index = accelerator.gather(samples.contiguous()), accelerator.gather(index.contiguous())
        keep = index >= 0
        samples, index = samples[keep], index[keep]
    out = samples.new_empty(n, *samples.shape[1:])
    out[index] = samples
    return out, labels.to(out.device), targets.to(out.device), report


def save_buffer(path: str, samples: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, block: int) -> None:
    """Write a replay buffer (inputs of vision block `block`, their labels and the targets they were
    inverted toward) as safetensors."""
    save_safetensors({"samples": samples.contiguous().cpu(), "labels": labels.contiguous().cpu(),
                      "targets": targets.contiguous().cpu()}, path,
                     metadata={"format": "hf_pmi.ReplayBuffer", "block": str(int(block))})  # reproducible bytes


def load_buffer(path: str, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(samples, labels, targets, block)`` of a buffer written by `save_buffer`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != "hf_pmi.ReplayBuffer":
        raise ValueError(f"{path} is not an hf_pmi replay buffer (format {metadata.get('format')!r}).")
    tensors = load_file(path, device=str(device) if device is not None else "cpu")
    return tensors["samples"], tensors["labels"], tensors["targets"], int(metadata["block"])
