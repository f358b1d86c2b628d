"""The method interface, its config and the registry that pairs them (as peft pairs a config with its model).

The trainer drives every method through the same hooks, in this order, for each task t:
``before_task(t)`` (after the task's classes were added to the model) -> ``plan_task(t)`` (what
to train on, and per-task settings) -> training with ``compute_loss`` -> evaluation ->
``after_task(t)`` -> ``save(folder)``. A method owns its config (a `MethodConfig` dataclass,
validated when it is made), its cross-checks (``validate``) and its model card entry
(``card_info``).

Example (a new method, anywhere before the trainer is built):
    >>> from dataclasses import dataclass, field
    >>> from typing import ClassVar
    >>> from hf_pmi.methods import ContinualMethod, MethodConfig, register_method
    >>> @dataclass
    ... class FrozenTextConfig(MethodConfig):
    ...     flag_prefix: ClassVar[str] = "frozen_text_"
    ...     freeze_projection: bool = field(default=False, metadata={"help": "Freeze the text projection too."})
    >>> @register_method("finetune_text_frozen", config=FrozenTextConfig)
    ... class FinetuneTextFrozen(ContinualMethod):
    ...     def before_task(self, task_id):
    ...         self.model.clip.text_model.requires_grad_(False)
    >>> FinetuneTextFrozen.config_class.__name__
    'FrozenTextConfig'
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data import TaskPlan

METHODS: dict[str, type["ContinualMethod"]] = {}


@dataclass
class MethodConfig:
    """Base of every method's settings. Subclasses are dataclasses whose fields carry
    ``metadata={"help": ...}`` and a ``flag_prefix`` (their command-line flags are ``--<prefix><field>``),
    or are composed of such dataclasses (`hf_pmi.arguments`). They validate in ``__post_init__``."""

    flag_prefix: ClassVar[str] = ""
    argument_group: ClassVar[str] = "method"

    def card_settings(self) -> dict[str, Any]:
        """The settings as a flat ``{"part.field": value}`` dict (the model card's method table)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
            else:
                out[f.name] = value
        return out


def register_method(name: str, config: type = MethodConfig):
    """Class decorator adding a `ContinualMethod` to `METHODS` under `name`, with its config class."""
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"The config of method {name!r} must be a MethodConfig subclass, got {config!r}.")

    def wrap(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"A method named {name!r} is already registered ({METHODS[name].__name__}).")
        cls.name = name
        cls.config_class = config
        METHODS[name] = cls
        return cls

    return wrap


def method_class(name: str) -> type["ContinualMethod"]:
    """The registered method `name` (a `ValueError` lists the available ones)."""
    if name not in METHODS:
        raise ValueError(
            f"Unknown method {name!r}. Available: {sorted(METHODS)}. Register a new one with "
            f"`@hf_pmi.methods.register_method`."
        )
    return METHODS[name]


class ContinualMethod:
    """Base class: plain training on the current task with CE over all seen classes (`finetune`)."""

    name = "base"
    config_class: type[MethodConfig] = MethodConfig
    data_free = True  # False for methods that keep or revisit real data of earlier tasks
    trains = True  # False for methods that never update the model (zero-shot)
    learns_from_names = False  # True for methods that learn names-only tasks (`hf_pmi.names_only`)
    default_head = "text"  # the classifier head when ``args.head`` names none (`hf_pmi.heads`)

    def __init__(self, trainer, config: MethodConfig | None = None):
        self.trainer = trainer
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"Method {self.name!r} takes a {self.config_class.__name__}, got {type(config).__name__}. Pass "
                f"method_config={self.config_class.__name__}(...) or choose the method that config belongs to."
            )
        self.config = config

    @property
    def model(self):
        return self.trainer.model

    @property
    def args(self):
        return self.trainer.args

    @property
    def tasks(self):
        return self.trainer.tasks

    @property
    def unwrapped_model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    @property
    def show_progress(self) -> bool:
        """Progress bars on long work: on the main process, unless ``disable_tqdm``."""
        return self.trainer.is_world_process_zero() and not self.args.disable_tqdm

    def validate(self) -> None:
        """Cross-checks with the model and the tasks before any long work starts; raise `ValueError` naming the fix."""

    def before_task(self, task_id: int) -> None:
        pass

    def trains_task(self, task_id: int) -> bool:
        """Whether task `task_id` is trained (default: every task of a method that trains)."""
        return self.trains

    def plan_task(self, task_id: int) -> TaskPlan:
        """What task `task_id` trains on (default: its own training data)."""
        return TaskPlan(self.tasks[task_id].train)

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        return model(pixel_values=inputs["pixel_values"], labels=inputs["labels"]).loss

    def refresh_head(self, model) -> None:
        """Before task `task_id`'s classes join the model's classifier head: move the old classes' statistics to
        the features of the model as now trained, where the method has the means to (replay methods: their
        samples through the teacher and the model). Default: the statistics stay as they were taken."""

    def after_task(self, task_id: int) -> dict:
        """Work between tasks (statistics, feature bank, replay synthesis); returns numbers to log."""
        return {}

    def save(self, folder: str) -> None:
        """Write the method's state (e.g. the feature bank) into a task checkpoint."""

    def load(self, folder: str) -> None:
        """Restore what `save` wrote (resuming, or continuing someone's checkpoint)."""

    def card_info(self) -> dict:
        """The model card's entry: ``settings`` (the method's hyper-parameters) and, for methods that
        invert the model, ``inversion`` (settings and costs)."""
        settings = self.config.card_settings()
        return {"settings": settings} if settings else {}

    # helpers shared by distillation methods
    def snapshot_teacher(self):
        """A frozen copy of the current model (the teacher for the next task)."""
        model = self.unwrapped_model
        head = getattr(model, "head", None)  # the teacher gives features and logits, not head scores
        object.__setattr__(model, "head", None)
        try:
            teacher = copy.deepcopy(model).eval()
        finally:
            object.__setattr__(model, "head", head)
        teacher.requires_grad_(False)
        return teacher

    def pooled_features(self, model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features, labels) of a whole dataset through `model`: what a classifier head learns from."""
        feats, labels = zip(*((model.pooled_features(x), y) for x, y in self.real_batches(dataset)))
        return torch.cat(feats), torch.cat(labels)

    def real_batches(self, dataset):
        """(pixel_values, labels) of a whole dataset on this process, in order (no sharding, no shuffle)."""
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size,
                            collate_fn=self.trainer.data_collator)
        for batch in loader:
            yield batch["pixel_values"].to(self.args.device), batch["labels"].to(self.args.device)

    def old_class_count(self, task_id: int) -> int:
        """Number of classes known before task `task_id` (including classes of a continued model)."""
        return self.tasks[task_id].class_ids[0]
