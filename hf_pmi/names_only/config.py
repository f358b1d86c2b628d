"""`NamesOnlyConfig`: the settings of learning classes from their names (flags ``--names_only_<field>``).

The projection settings are the reference's; the inversion and training differ (docs/names_only.md
lists each difference): a balancing CE that also trains the image tower, a distillation from the
raw CLIP on samples mixed between new and old classes, and scoring the new classes with the raw CLIP
at inference (``scoring``). ``preset="reference"`` gives the reference's names-only path
(`REFERENCE_PRESET`).

Example:
    >>> NamesOnlyConfig().boundary_kd > 0, NamesOnlyConfig(preset="reference").boundary_kd
    (True, 0.0)
    >>> NamesOnlyConfig(preset="reference").repeats, NamesOnlyConfig(preset="reference", repeats=3).repeats
    (10, 3)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..validation import ValidationError, require_count, require_positive, require_weight

BOUNDARY_KD = 1.0  # measured on the shapes world (docs/names_only.md)
SCORINGS = ("route", "product", "adapted")
TEACHER_TEXTS = ("teacher", "student")

# The reference's names-only (open-set) path, `moe_adapter_open_world.py` with `configs/moe_openset/cf100.yaml`,
# as the values of the settings where hf_pmi's defaults differ. `NamesOnlyConfig(preset="reference")` applies
# them to every field left at its default. The reference's code ships one open-set config, CIFAR-100's
# (`configs/moe_openset/cf100.yaml`): the preset takes it.
REFERENCE_PRESET = {
    "open_rf": 0.02,  # inversion: per-layer weight open_rf x number of blocks, refinement KL weight open_rf
    "num_train_epochs": 1.0,  # openset_epoch
    "repeats": 10,  # its RandomDataset repeats the samples ten times per epoch
    "schedule_epochs": 3.0,  # cosine_lr(..., 3 * batches per epoch) whatever the epochs
    "warmup_steps": 30,
    "batch_size": 64,
    "replay_batch_size": 64,  # the replay batch is the new batch's size
    "l_hkd": 0.0,  # openset_hkd (task-weighted like the run's; the code's default 0.1)
    "l_tkd": 0.0,  # openset_tkd (the code's default 0.1)
    "l_ft": 0.001,  # openset_ft, image features detached, not task-weighted
    "ft_detach": True,
    "teacher_text": "student",  # prv_ft 0: the teacher's logits over the student's old-class text features
    "boundary_kd": 0.0,  # no distillation from the raw CLIP
    "scoring": "adapted",  # the trained model alone scores the new classes
}
PRESETS = {"reference": REFERENCE_PRESET}


@dataclass
class NamesOnlyConfig:
    """Settings of a names-only task (module docstring); ``preset="reference"`` gives the reference's names-only
    path (`REFERENCE_PRESET`). The task's own learning rate, epochs, warm-up, schedule and batch sizes replace
    the run's for that task only."""

    flag_prefix: ClassVar[str] = "names_only_"
    argument_group: ClassVar[str] = "names-only tasks (NamesOnlyConfig)"

    preset: str = field(
        default="",
        metadata={"help": "'reference': the reference's names-only path (its one open-set config, CIFAR-100's); "
                  "fields given explicitly keep their value. '': hf_pmi's defaults."},
    )
    neighbours: int = field(default=5, metadata={"help": "K: old classes projected from (reference 5)."})
    per_class: int = field(default=20, metadata={"help": "m: samples per neighbour, and targets per new class (reference 20)."})
    gamma: float = field(default=0.1, metadata={"help": "Shift of the projected feature toward the text prototype (reference 0.1)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of the names-only task (reference 5e-4)."})
    num_train_epochs: float = field(
        default=10.0,
        metadata={"help": "Epochs over the inverted samples (reference 1, each epoch `repeats` passes over them)."},
    )
    repeats: int = field(
        default=1, metadata={"help": "Passes over the inverted samples per epoch (reference 10: its data set repeats them)."}
    )
    warmup_steps: float = field(
        default=0, metadata={"help": "Warm-up steps of the names-only task (reference 30)."}
    )
    schedule_epochs: float | None = field(
        default=None,
        metadata={"help": "Length of the cosine schedule in epochs; training stops after `num_train_epochs`, "
                  "part-way along it when shorter (None: `num_train_epochs`; reference 3, whatever its epochs)."},
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch of inverted samples (None: the run's --per_device_train_batch_size; reference 64). "
                  "Takes effect where the trainer rebuilds its batch size per task."},
    )
    replay_batch_size: int | None = field(
        default=None, metadata={"help": "Replayed old-class samples per batch (None: the run's; reference 64)."}
    )
    open_rf: float | None = field(
        default=None,
        metadata={"help": "The reference's open_rf: when set, the inversion's per-layer statistics weight is open_rf x "
                  "number of vision blocks and its refinement KL weight open_rf (`a_layer` is then unused; "
                  "reference 0.02). None: `a_layer`, and the run's refinement KL weight."},
    )
    a_layer: float = field(default=0.02, metadata={"help": "Statistics weight of the per-layer inversion (when open_rf is None)."})
    refine_lr: float = field(default=0.1, metadata={"help": "Learning rate of the full-model refinement (reference 0.1)."})
    alpha_tv: float = field(default=0.0, metadata={"help": "Total variation weight (reference: no TV)."})
    l_hkd: float | None = field(
        default=None,
        metadata={"help": "Weight of the logit distillation on old replay in this task, task-weighted as the run's "
                  "(None: the run's `l_hkd`; reference 0)."},
    )
    l_tkd: float | None = field(
        default=None,
        metadata={"help": "Weight of the old text-feature distillation in this task (None: the run's `l_tkd`; "
                  "reference 0)."},
    )
    l_ft: float | None = field(
        default=1.0,
        metadata={"help": "Weight of the balancing CE over all classes, on the new samples and the old replay, in this "
                  "task (None: the run's `l_ft`; reference 0.001, image features detached). It keeps old images "
                  "away from the new names."},
    )
    ft_detach: bool | None = field(
        default=False, metadata={"help": "Detach image features in that CE (None: the run's `ft_detach`; reference True)."}
    )
    teacher_text: str | None = field(
        default=None,
        metadata={"help": "Old-class text features of the teacher's logits in the logit distillation: 'teacher' or "
                  "'student' (None: the run's `replay.teacher_text`; reference 'student')."},
    )
    boundary_kd: float = field(
        default=BOUNDARY_KD,
        metadata={"help": "Weight of the boundary distillation (beyond the reference, 0: off): on patch maps mixed "
                  "between new samples and old replay, the model learns the raw CLIP's split between old and new "
                  "names and the previous model's split among the old ones."},
    )
    boundary_kd_temperature: float = field(default=2.0, metadata={"help": "Temperature of that distillation."})
    scoring: str = field(
        default="route",
        metadata={"help": "How this task's classes are scored at inference (`hf_pmi.routing`; beyond the reference; "
                  "a LoRA model only: 'route' and 'product' cost a second pass through the vision tower, adapters "
                  "off). 'route': the raw CLIP's probability, with the mean of their projected features as class "
                  "embeddings, the rest split by the trained model. 'product': the product of the raw CLIP's and "
                  "the trained model's probabilities over all classes. 'adapted': the trained model alone (reference)."},
    )

    def __post_init__(self):
        if self.preset not in ("", *PRESETS):
            raise ValidationError(f"{self.flag_prefix}preset must be one of {['', *PRESETS]}, got {self.preset!r}.")
        if self.preset:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, value in PRESETS[self.preset].items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        p = self.flag_prefix
        require_count(p + "neighbours", self.neighbours)
        require_count(p + "per_class", self.per_class)
        require_count(p + "repeats", self.repeats)
        require_positive(p + "learning_rate", self.learning_rate)
        require_positive(p + "num_train_epochs", self.num_train_epochs)
        for name in ("a_layer", "alpha_tv", "boundary_kd", "warmup_steps"):
            require_weight(p + name, getattr(self, name))
        require_positive(p + "refine_lr", self.refine_lr)
        require_positive(p + "boundary_kd_temperature", self.boundary_kd_temperature)
        for name in ("l_ft", "l_hkd", "l_tkd", "open_rf"):
            if getattr(self, name) is not None:
                require_weight(p + name, getattr(self, name))
        if self.schedule_epochs is not None:
            require_positive(p + "schedule_epochs", self.schedule_epochs)
        for name in ("batch_size", "replay_batch_size"):
            if getattr(self, name) is not None:
                require_count(p + name, getattr(self, name))
        if self.scoring not in SCORINGS:
            raise ValidationError(f"{p}scoring must be one of {list(SCORINGS)}, got {self.scoring!r}.")
        if self.teacher_text is not None and self.teacher_text not in TEACHER_TEXTS:
            raise ValidationError(f"{p}teacher_text must be one of {list(TEACHER_TEXTS)} or unset, got {self.teacher_text!r}.")

    def training_overrides(self, samples: int, batch_size: int, num_processes: int = 1) -> dict:
        """The `TrainingArguments` values that hold for a names-only task of `samples` samples (repeats
        included), at `batch_size` per process (the task's own, or the run's) on `num_processes` processes:
        its learning rate, epochs and warm-up, its batch size if set, and with `schedule_epochs` a cosine
        schedule that long (`lr_at_step` gives the lr it makes; without, the run's schedule)."""
        overrides = {"learning_rate": self.learning_rate, "num_train_epochs": self.num_train_epochs,
                     "warmup_steps": self.warmup_steps}
        if self.batch_size is not None:
            overrides["per_device_train_batch_size"] = self.batch_size
        if self.schedule_epochs is not None:
            per_epoch = math.ceil(samples / (batch_size * num_processes))
            steps = math.ceil(per_epoch * self.num_train_epochs)
            length = math.ceil(per_epoch * self.schedule_epochs)
            # transformers' cosine: 0.5 (1 + cos(pi * 2 num_cycles * (s - w) / (steps - w))); with this num_cycles
            # it is 0.5 (1 + cos(pi (s - w) / (length - w))), a schedule `length` steps long cut at `steps`
            cycles = 0.5
            if steps > self.warmup_steps and length > self.warmup_steps:
                cycles = 0.5 * (steps - self.warmup_steps) / (length - self.warmup_steps)
            overrides.update(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycles": cycles})
        return overrides


def lr_at_step(step: int, learning_rate: float, warmup_steps: float, length: int) -> float:
    """The learning rate of a names-only task at optimizer step `step` (0-based): linear warm-up over
    `warmup_steps`, then a cosine from `learning_rate` to 0 over the schedule's `length` steps (the
    reference's ``cosine_lr``, with transformers' warm-up that starts at 0).

    Example:
        >>> lr_at_step(0, 1.0, 10, 100), lr_at_step(5, 1.0, 10, 100), round(lr_at_step(55, 1.0, 10, 100), 3)
        (0.0, 0.5, 0.5)
    """
    if step < warmup_steps:
        return learning_rate * step / max(1, warmup_steps)
    return learning_rate * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, length - warmup_steps)))
