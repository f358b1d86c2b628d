"""`exemplar_replay`: the replay of `pmi` with real images instead of inverted ones. NOT data-free.

Keeps the patch maps of the first ``per_class`` training images of every class (the patch
embedding is frozen, so they are the images themselves) and trains with exactly the losses,
teacher and batch mix of `pmi`. It is the ceiling any inversion can reach under those losses:
the gap between `pmi` and `exemplar_replay` is what the inversion loses, the gap between
`exemplar_replay` and `finetune` what the replay losses can recover at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

from ..blocks import VisionBlocks
from ..replay import ReplayConfig
from ..validation import require_count
from .base import MethodConfig, register_method
from .rehearsal import ReplayMethod

EXEMPLARS_NAME = "exemplars.safetensors"


@dataclass
class ExemplarConfig:
    """How many real images per class `exemplar_replay` keeps (flags ``--exemplar_<field>``)."""

    flag_prefix: ClassVar[str] = "exemplar_"
    argument_group: ClassVar[str] = "exemplars (ExemplarConfig)"

    per_class: int = field(default=5, metadata={"help": "Real training images kept per class (as pmi's 5 replay samples)."})

    def __post_init__(self):
        require_count(self.flag_prefix + "per_class", self.per_class)


@dataclass
class ExemplarReplayConfig(MethodConfig):
    """Settings of `exemplar_replay`: `pmi`'s replay training, real images instead of inverted ones."""

    replay: ReplayConfig = field(default_factory=ReplayConfig)
    exemplars: ExemplarConfig = field(default_factory=ExemplarConfig)


@register_method("exemplar_replay", config=ExemplarReplayConfig)
class ExemplarReplay(ReplayMethod):
    """Replay ``exemplars.per_class`` stored real images per class with the `pmi` losses (an upper bound)."""

    data_free = False

    def after_task(self, task_id: int) -> dict:
        """Keep the first ``per_class`` images of each new class, in the task's data order."""
        blocks = VisionBlocks(self.unwrapped_model)
        per_class = self.config.exemplars.per_class
        kept: dict[int, list[torch.Tensor]] = {c: [] for c in self.tasks[task_id].class_ids}
        with torch.no_grad():
            for pixels, labels in self.real_batches(self.tasks[task_id].train):
                maps = blocks.patch_embed(pixels)
                for x, y in zip(maps, labels.tolist()):
                    if len(kept[y]) < per_class:
                        kept[y].append(x)
                if all(len(v) == per_class for v in kept.values()):
                    break  # a streaming task need not be read to the end
        samples = torch.stack([x for c in kept for x in kept[c]])
        labels = torch.tensor([c for c in kept for _ in kept[c]], dtype=torch.long, device=samples.device)
        if self.buffer is not None:
            samples, labels = torch.cat([self.buffer[0], samples]), torch.cat([self.buffer[1], labels])
        self.buffer = (samples, labels)
        return {"exemplars": int(labels.numel())}

    def save(self, folder: str) -> None:
        if self.buffer is not None:
            samples, labels = self.buffer
            save_file({"patch_maps": samples.contiguous().cpu(), "labels": labels.cpu()}, os.path.join(folder, EXEMPLARS_NAME))

    def load(self, folder: str) -> None:
        path = os.path.join(folder, EXEMPLARS_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} has no {EXEMPLARS_NAME}: it was not written by method='exemplar_replay'.")
        tensors = load_file(path, device=str(self.trainer.args.device))
        self.buffer = (tensors["patch_maps"], tensors["labels"])
