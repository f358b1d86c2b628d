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
from .base import ContinualMethod, TaskPlan

GRID_NAME = "replay_samples.png"


class ReplayMethod(ContinualMethod):
    """Base of the replay methods (module docstring); ``self.config.replay`` is a `ReplayConfig`."""

    replay_block = 1  # the vision block the buffer's samples enter (1: patch maps)
    default_head = "ranpac"  # benchmarks/heads.py: the text head loses half the accuracy the features keep

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

    def plan_task(self, task_id: int) -> TaskPlan:
        """The task's own data; the tasks that replay train at ``replay.later_lr_scale`` times the learning rate."""
        plan = super().plan_task(task_id)
        if self.teacher is not None and self.config.replay.later_lr_scale != 1:
            plan.overrides.setdefault("learning_rate", self.args.learning_rate * self.config.replay.later_lr_scale)
        return plan

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
        settings = self.config.replay
        real = inputs["pixel_values"] if settings.l_fd_real else None  # the teacher sees real images only for that
        with torch.no_grad():
            teacher_out = self.teacher(pixel_values=real, replay_inputs=replay, replay_block=self.replay_block)
        terms = replay_losses(out, teacher_out, inputs["labels"], replay_labels, self.num_old, self.weights,
                              settings.l_ft, settings.ft_detach, settings.teacher_text, settings.l_fd)
        if settings.l_fd_real:
            terms["fd_real"] = settings.l_fd_real * (out.pooled_embeds - teacher_out.pooled_embeds).pow(2).mean()
        return sum(terms.values())

    def refresh_head(self, model) -> None:
        """Drift compensation (``replay.head_drift``): each old class's head statistics move by the mean
        displacement of its replay samples' pooled features from the teacher (the model the statistics were
        last moved to) to the model as now trained."""
        if self.teacher is None or not self.config.replay.head_drift or model.head is None:
            return
        samples, labels = self.buffer
        before, after = [], []
        for i in range(0, len(labels), self.args.per_device_eval_batch_size):
            x = samples[i : i + self.args.per_device_eval_batch_size]
            before.append(self.teacher.pooled_features(replay_inputs=x, replay_block=self.replay_block))
            after.append(model.pooled_features(replay_inputs=x, replay_block=self.replay_block))
        model.head.shift_classes(torch.cat(before), torch.cat(after), labels)

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
