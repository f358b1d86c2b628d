"""`ContinualConfig`: `TrainingArguments` plus the continual-learning settings, all flat.

The defaults are the reference configuration of the PMI paper for CLIP (AdamW lr 1e-3, weight
decay 0, cosine schedule with 30 warm-up steps, batch 64, 3 epochs per task) with the settings
transformers v5 needs for an image model (`remove_unused_columns=False`, `label_names`).
Inversion settings live in `hf_pmi.inversion.InversionConfig`.

Example:
    >>> from transformers import HfArgumentParser
    >>> from hf_pmi import ContinualConfig
    >>> (args,) = HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(["--output_dir", "out", "--method", "joint"])
    >>> args.method, args.learning_rate, args.remove_unused_columns
    ('joint', 0.001, False)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


@dataclass
class ContinualConfig(TrainingArguments):
    method: str | None = field(
        default=None,
        metadata={"help": "Continual method, a name from `hf_pmi.methods.METHODS` (pmi, finetune, joint, lwf, ...). "
                  "Default: finetune, or the checkpoint's method when continuing one."},
    )
    # Replay training (method.md "Training task t+1"); reference values for CLIP.
    replay_batch_size: int = field(
        default=64, metadata={"help": "Synthetic samples added to every real batch (drawn with replacement)."}
    )
    l_ce: float = field(default=1.0, metadata={"help": "Weight of the local CE on new classes (before task weighting)."})
    l_hkd: float = field(default=0.1, metadata={"help": "Weight of the L1 logit distillation on replayed samples."})
    l_tkd: float = field(default=0.2, metadata={"help": "Weight of the L1 distillation of old text features (0.1 CUB)."})
    l_ft: float = field(
        default=0.001, metadata={"help": "Weight of the balancing CE on detached image features (0.1 CUB)."}
    )
    ft_detach: bool = field(
        default=True,
        metadata={"help": "Detach image features in the balancing CE (reference: True, it then trains the text side "
                  "only). False lets it also train the vision tower to tell new from old classes, which a model "
                  "without pre-trained image-text alignment (or with a frozen text tower) needs."},
    )
    lwf_temperature: float = field(default=2.0, metadata={"help": "LwF: distillation temperature (Li & Hoiem use 2)."})
    lwf_alpha: float = field(default=1.0, metadata={"help": "LwF: weight of the distillation term."})
    keep_replay_samples: int = field(
        default=64, metadata={"help": "Replayed samples rendered to `task-{t}/replay_samples.png` (0: no grid)."}
    )

    # Reference training defaults (method.md) and what transformers v5 needs for image inputs.
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (reference: 1e-3)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (reference: 0)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs per task (reference: 3; 10 for CUB)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Real samples per batch (reference: 64)."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule per task (reference: cosine)."})
    warmup_steps: float = field(default=30, metadata={"help": "Warm-up steps per task (reference: 30)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the image column is decoded by the collator."}
    )
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Label key."})
    save_strategy: str = field(
        default="no", metadata={"help": "Mid-task Trainer checkpoints; per-task checkpoints are always written."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers to report to."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start again in an output_dir that holds finished tasks, deleting them (otherwise such a "
                  "folder is refused; --resume_from_checkpoint true continues it instead)."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every trainable parameter is used in each step."}
    )

    def __post_init__(self):
        super().__post_init__()
        from .methods import METHODS

        if self.dataloader_pin_memory and not _accelerator_available():
            self.dataloader_pin_memory = False  # pinned memory only helps copies to an accelerator (torch warns)
        self.method_given = self.method is not None  # a continued run keeps the checkpoint's method otherwise
        if self.method is None:
            self.method = "finetune"

        if self.method not in METHODS:
            raise ValueError(
                f"Unknown method {self.method!r}. Available: {sorted(METHODS)}. Register a new one with "
                f"`@hf_pmi.methods.register_method`."
            )
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the image column before the collator sees it; set it to False."
            )
