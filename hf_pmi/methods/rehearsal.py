"""What every replay method shares: a frozen teacher, a buffer of replayed samples and the replay losses.

During task t (t > 0, once the buffer holds samples) every real batch is joined by
``replay.batch_size`` samples (inputs of vision block `replay_block`) drawn with replacement from the buffer (a generator per task and
process, `hf_pmi.seeding.replay_seed`) and trained with `hf_pmi.replay.replay_losses` against the
model as it was at the end of task t-1. Methods differ by how the buffer is filled: `pmi` inverts
the model, `exemplar_replay` keeps real images.
"""

from __future__ import annotations

import os

import torch

from ..replay import task_weights
from ..replay import replay_losses
from ..seeding import replay_seed
from .base import ContinualMethod

GRID_NAME = "replay_samples.png"


class ReplayMethod(ContinualMethod):
    """Base of the replay methods (module docstring); ``self.config.replay`` is a `ReplayConfig`."""

    replay_block = 1  # the vision block the buffer's samples enter (1: patch maps)

    def __init__(self, trainer, config=None):
        super().__init__(trainer, config)
        self.teacher = None
        self.buffer: tuple[torch.Tensor, torch.Tensor] | None = None
        self.task_id = None

    def before_task(self, task_id: int) -> None:
        self.task_id = task_id
        self.num_old = self.old_class_count(task_id)
        self.teacher = self.snapshot_teacher() if self.num_old and self.buffer is not None else None
        if self.teacher is not None:
            replay = self.config.replay
            self.weights = task_weights(self.num_old, len(self.tasks[task_id].class_ids), replay.l_ce, replay.l_hkd,
                                        replay.l_tkd)
            # replay draws differ per process, as data shards do
            rank = self.trainer.accelerator.process_index
            self.generator = torch.Generator().manual_seed(replay_seed(self.args.seed, task_id, rank))

    def draw_replay(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` (default ``replay.batch_size``) samples and their labels, drawn with replacement from the buffer."""
        samples, labels = self.buffer
        idx = torch.randint(len(labels), (size or self.config.replay.batch_size,), generator=self.generator)
        return samples[idx.to(samples.device)], labels[idx.to(labels.device)]

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        if self.teacher is None:  # first task: plain CE
            return model(pixel_values=inputs["pixel_values"], labels=inputs["labels"]).loss
        replay, replay_labels = self.draw_replay()
        out = model(pixel_values=inputs["pixel_values"], replay_inputs=replay, replay_block=self.replay_block)
        with torch.no_grad():
            teacher_out = self.teacher(replay_inputs=replay, replay_block=self.replay_block)
        terms = replay_losses(out, teacher_out, inputs["labels"], replay_labels, self.num_old, self.weights,
                              self.config.replay.l_ft, self.config.replay.ft_detach, self.config.replay.teacher_text)
        return sum(terms.values())

    def save(self, folder: str) -> None:
        """The replay grid: the first ``replay.grid_samples`` samples of the buffer, as images (patch maps only:
        tokens deeper in the tower have no image to show)."""
        n = self.config.replay.grid_samples
        if self.buffer is None or not n or self.replay_block != 1:
            return
        from ..visualize import patch_maps_to_images, save_image_grid

        image_processor = self.trainer.processing_class.image_processor
        samples, labels = self.buffer
        images = patch_maps_to_images(self.unwrapped_model, samples[:n], image_processor.image_mean,
                                      image_processor.image_std)
        save_image_grid(images, labels[:n].tolist(), self.model.class_names, os.path.join(folder, GRID_NAME))
