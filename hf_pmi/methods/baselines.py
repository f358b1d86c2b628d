"""Reference points every other method is read against: `finetune`, `joint`, `zero_shot`."""

from __future__ import annotations

from .base import ContinualMethod, TaskPlan, register_method


@register_method("finetune")
class Finetune(ContinualMethod):
    """Lower bound: train on each task in turn with CE over all seen classes, nothing else."""


@register_method("joint")
class Joint(ContinualMethod):
    """Upper bound: train on the real data of every task seen so far. NOT data-free."""

    data_free = False

    def plan_task(self, task_id: int) -> TaskPlan:
        return TaskPlan(self.tasks.seen_train(task_id))


@register_method("zero_shot")
class ZeroShot(ContinualMethod):
    """No training: classify by class name only (meaningful only with a pre-trained CLIP)."""

    trains = False
