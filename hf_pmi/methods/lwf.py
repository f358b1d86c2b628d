"""`lwf`: Learning without Forgetting (Li & Hoiem, 2016): distil the previous model's old-class
logits on the new task's real images. Data-free, no synthetic samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..validation import require_positive, require_weight
from .base import ContinualMethod, MethodConfig, register_method


@dataclass
class LwFConfig(MethodConfig):
    """Settings of `lwf` (flags ``--lwf_<field>``)."""

    flag_prefix: ClassVar[str] = "lwf_"
    argument_group: ClassVar[str] = "lwf (LwFConfig)"

    temperature: float = field(default=2.0, metadata={"help": "Distillation temperature (Li & Hoiem use 2)."})
    alpha: float = field(default=1.0, metadata={"help": "Weight of the distillation term."})
    l_fd: float = field(
        default=0.0,
        metadata={"help": "Weight of a feature distillation on the task's images: the mean squared difference of the "
                  "student's and the previous model's pooled image features, what a classifier head reads (0: none)."},
    )

    def __post_init__(self):
        require_positive(self.flag_prefix + "temperature", self.temperature)
        require_weight(self.flag_prefix + "alpha", self.alpha)
        require_weight(self.flag_prefix + "l_fd", self.l_fd)


@register_method("lwf", config=LwFConfig)
class LwF(ContinualMethod):
    teacher = None

    def before_task(self, task_id: int) -> None:
        self.num_old = self.old_class_count(task_id)
        self.teacher = self.snapshot_teacher() if self.num_old else None

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        out = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
        if self.teacher is None:
            return out.loss
        with torch.no_grad():
            teacher_out = self.teacher(pixel_values=inputs["pixel_values"])
        T = self.config.temperature
        kd = F.kl_div(F.log_softmax(out.logits[:, : self.num_old] / T, dim=-1),
                      F.softmax(teacher_out.logits[:, : self.num_old] / T, dim=-1), reduction="batchmean")
        loss = out.loss + self.config.alpha * T * T * kd  # T^2 keeps the gradient scale of Hinton et al.
        if self.config.l_fd:
            loss = loss + self.config.l_fd * (out.pooled_embeds - teacher_out.pooled_embeds).pow(2).mean()
        return loss
