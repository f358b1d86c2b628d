"""`lwf`: Learning without Forgetting (Li & Hoiem, 2016): distil the previous model's old-class
logits on the new task's real images. Data-free, no synthetic samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ContinualMethod, old_class_count, register_method


@register_method("lwf")
class LwF(ContinualMethod):
    teacher = None

    def before_task(self, task_id: int) -> None:
        self.num_old = old_class_count(self.trainer, task_id)
        self.teacher = self.snapshot_teacher() if self.num_old else None

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        out = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
        if self.teacher is None:
            return out.loss
        with torch.no_grad():
            old = self.teacher(pixel_values=inputs["pixel_values"]).logits[:, : self.num_old]
        T = self.args.lwf_temperature
        kd = F.kl_div(
            F.log_softmax(out.logits[:, : self.num_old] / T, dim=-1), F.softmax(old / T, dim=-1), reduction="batchmean"
        )
        return out.loss + self.args.lwf_alpha * T * T * kd  # T^2 keeps the gradient scale of Hinton et al.
