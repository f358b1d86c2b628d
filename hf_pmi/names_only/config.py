"""`NamesOnlyConfig`: the settings of learning classes from their names (flags ``--names_only_<field>``).

The projection and inversion settings are the reference's; the training differs where measured
better (docs/names_only.md): a balancing CE that also trains the image tower, a distillation from
the raw CLIP on samples mixed between new and old classes, and routing the new classes to the raw
CLIP at inference. ``preset="reference"`` gives the reference's training.

Example:
    >>> NamesOnlyConfig().boundary_kd > 0, NamesOnlyConfig(preset="reference").boundary_kd
    (True, 0.0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from ..validation import ValidationError, require_count, require_positive, require_weight

BOUNDARY_KD = 1.0  # measured on the shapes world (docs/names_only.md)

# The reference's names-only training, as the values of the settings where hf_pmi's defaults differ
# (measured on the shapes world, docs/names_only.md). `NamesOnlyConfig(preset="reference")` applies them.
REFERENCE_PRESET = {
    "num_train_epochs": 3.0,  # reference: 1-5 epochs
    "l_ft": None,  # the run's balancing CE (reference 0.001-0.1, image features detached)
    "ft_detach": None,
    "boundary_kd": 0.0,  # no distillation from the raw CLIP
    "route": False,  # the trained model alone scores the new classes
}


@dataclass
class NamesOnlyConfig:
    """Settings of a names-only task (module docstring); ``preset="reference"`` gives the reference's training.
    The task's own learning rate, epochs and warm-up replace the run's for that task only."""

    flag_prefix: ClassVar[str] = "names_only_"
    argument_group: ClassVar[str] = "names-only tasks (NamesOnlyConfig)"

    preset: str = field(
        default="",
        metadata={"help": "'reference': the reference's names-only training (fields given explicitly keep their "
                  "value). '': hf_pmi's defaults."},
    )
    neighbours: int = field(default=5, metadata={"help": "K: old classes projected from (reference 5)."})
    per_class: int = field(default=20, metadata={"help": "m: samples per neighbour, and targets per new class (reference 20)."})
    gamma: float = field(default=0.1, metadata={"help": "Shift of the projected feature toward the text prototype (reference 0.1)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of the names-only task (reference 5e-4)."})
    num_train_epochs: float = field(
        default=10.0, metadata={"help": "Epochs over the inverted samples (reference 1-5; 60 samples at batch 32 make 2 steps an epoch)."}
    )
    warmup_steps: float = field(
        default=0, metadata={"help": "Warm-up steps of the names-only task: a few dozen samples make only a few steps."}
    )
    a_layer: float = field(default=0.02, metadata={"help": "Statistics weight of the per-layer inversion (reference 0.02)."})
    refine_lr: float = field(default=0.1, metadata={"help": "Learning rate of the full-model refinement (reference 0.1)."})
    alpha_tv: float = field(default=0.0, metadata={"help": "Total variation weight (reference: no TV)."})
    l_ft: float | None = field(
        default=1.0,
        metadata={"help": "Weight of the balancing CE over all classes, on the new samples and the old replay, in this "
                  "task (None: the run's `l_ft`, as the reference). It keeps old images away from the new names."},
    )
    ft_detach: bool | None = field(
        default=False, metadata={"help": "Detach image features in that CE (None: the run's `ft_detach`; reference True)."}
    )
    boundary_kd: float = field(
        default=BOUNDARY_KD,
        metadata={"help": "Weight of the boundary distillation (beyond the reference, 0: off): on patch maps mixed "
                  "between new samples and old replay, the model learns the raw CLIP's split between old and new "
                  "names and the previous model's split among the old ones."},
    )
    boundary_kd_temperature: float = field(default=2.0, metadata={"help": "Temperature of that distillation."})
    route: bool = field(
        default=True,
        metadata={"help": "Score this task's classes at inference with the raw CLIP and the mean of their projected "
                  "features, the rest split by the trained model (`hf_pmi.routing`; beyond the reference; a LoRA "
                  "model only: it costs a second pass through the vision tower). False: the trained model alone, "
                  "as the reference."},
    )

    def __post_init__(self):
        if self.preset not in ("", "reference"):
            raise ValidationError(f"{self.flag_prefix}preset must be '' or 'reference', got {self.preset!r}.")
        if self.preset:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, value in REFERENCE_PRESET.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        p = self.flag_prefix
        require_count(p + "neighbours", self.neighbours)
        require_count(p + "per_class", self.per_class)
        require_positive(p + "learning_rate", self.learning_rate)
        require_positive(p + "num_train_epochs", self.num_train_epochs)
        for name in ("a_layer", "alpha_tv", "boundary_kd", "warmup_steps"):
            require_weight(p + name, getattr(self, name))
        require_positive(p + "refine_lr", self.refine_lr)
        require_positive(p + "boundary_kd_temperature", self.boundary_kd_temperature)
        if self.l_ft is not None:
            require_weight(p + "l_ft", self.l_ft)

    def training_overrides(self) -> dict:
        """The `TrainingArguments` values that hold for a names-only task."""
        return {"learning_rate": self.learning_rate, "num_train_epochs": self.num_train_epochs,
                "warmup_steps": self.warmup_steps}
