"""Registry of continual methods. A method is one small class in one module of this package.

The trainer drives every method through the same hooks, in this order, for each task t:
``before_task(t)`` (after the task's classes were added to the model) -> training on
``train_dataset(t)`` with ``compute_loss`` -> evaluation -> ``after_task(t)`` -> ``save(folder)``.

Example (a new method in a new module of this package, or anywhere before the trainer is built):
    >>> from hf_pmi.methods import ContinualMethod, register_method
    >>> @register_method("finetune_text_frozen")
    ... class FinetuneTextFrozen(ContinualMethod):
    ...     def before_task(self, task_id):
    ...         self.model.clip.text_model.requires_grad_(False)
"""

from __future__ import annotations

import copy
import importlib
import pkgutil


METHODS: dict[str, type["ContinualMethod"]] = {}


def register_method(name: str):
    """Class decorator adding a `ContinualMethod` to `METHODS` under `name`."""

    def wrap(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"A method named {name!r} is already registered ({METHODS[name].__name__}).")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


class ContinualMethod:
    """Base class: plain training on the current task with CE over all seen classes (`finetune`)."""

    name = "base"
    data_free = True  # False for methods that keep or revisit real data of earlier tasks
    trains = True  # False for methods that never update the model (zero-shot)

    def __init__(self, trainer):
        self.trainer = trainer

    @property
    def model(self):
        return self.trainer.model

    @property
    def args(self):
        return self.trainer.args

    @property
    def tasks(self):
        return self.trainer.tasks

    def validate(self) -> None:
        """Check settings before any long work starts; raise `ValueError` naming the fix."""

    def train_dataset(self, task_id: int):
        return self.tasks[task_id].train

    def before_task(self, task_id: int) -> None:
        pass

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        return model(pixel_values=inputs["pixel_values"], labels=inputs["labels"]).loss

    def after_task(self, task_id: int) -> dict:
        """Work between tasks (statistics, feature bank, replay synthesis); returns numbers to log."""
        return {}

    def save(self, folder: str) -> None:
        """Write the method's state (e.g. the feature bank) into a task checkpoint."""

    def load(self, folder: str) -> None:
        """Restore what `save` wrote (resuming, or continuing someone's checkpoint)."""

    def card_info(self) -> dict | None:
        """Settings and costs for the model card (None: nothing to add)."""
        return None

    # helpers shared by distillation methods
    def snapshot_teacher(self):
        """A frozen copy of the current model (the teacher for the next task)."""
        teacher = copy.deepcopy(self.trainer.accelerator.unwrap_model(self.model)).eval()
        teacher.requires_grad_(False)
        return teacher


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def old_class_count(trainer, task_id: int) -> int:
    """Number of classes known before task `task_id` (including classes of a continued model)."""
    return trainer.tasks[task_id].class_ids[0]


_discover()

__all__ = ["METHODS", "ContinualMethod", "register_method", "old_class_count"]
