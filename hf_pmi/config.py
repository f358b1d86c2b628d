"""`ContinualConfig`: `TrainingArguments` plus the continual-learning settings, all flat.

The defaults are the reference configuration of the PMI paper for CLIP (AdamW lr 1e-3, weight
decay 0, cosine schedule with 30 warm-up steps, batch 64, 3 epochs per task) with the settings
transformers v5 needs for an image model (`remove_unused_columns=False`, `label_names`).
A method's own settings live in its config (`hf_pmi.methods.METHODS[name].config_class`, e.g.
`hf_pmi.methods.pmi.PMIConfig`), given to the trainer as ``method_config``.

Example:
    >>> from transformers import HfArgumentParser
    >>> from hf_pmi import ContinualConfig
    >>> (args,) = HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(["--output_dir", "out", "--method", "joint"])
    >>> args.method, args.learning_rate, args.remove_unused_columns
    ('joint', 0.001, False)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments

from .validation import check_task_loop_arguments


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


DEFAULT_METHOD = "pmi"  # the library's method: the method of a run that names none


@dataclass
class ContinualConfig(TrainingArguments):
    # what `hf-pmi train --help` shows first (hf_pmi.arguments.GroupedArgumentParser); the rest is the Trainer's
    flag_groups: ClassVar[dict] = {"continual run (ContinualConfig)": (
        "method", "head", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "seed", "push_to_hub",
        "hub_model_id")}
    default_flag_group: ClassVar[str] = "Trainer (transformers.TrainingArguments, with hf_pmi's defaults)"

    method: str | None = field(
        default=None,
        metadata={"help": f"Continual method, a name from `hf_pmi.methods.METHODS` (pmi, full_inversion, "
                  f"feature_replay, lwf, finetune, exemplar_replay, joint, zero_shot); its settings are the flags of "
                  f"its config (`--method <name> --help` lists them). Default: {DEFAULT_METHOD}, or the checkpoint's "
                  f"method when continuing one."},
    )
    head: str | None = field(
        default=None,
        metadata={"help": "Classifier the model predicts with (`hf_pmi.heads`): 'text' (CLIP's class-name embeddings), "
                  "'ncm' (nearest class mean of the pooled image features) or 'ranpac' (ridge regression on a fixed "
                  "random projection of them). 'ncm' / 'ranpac' keep per-class statistics only, added as each task "
                  "is learned and saved with every checkpoint. Default: the method's own ('ranpac' for the methods "
                  "ncm / ranpac keep theirs), a continued checkpoint's, else 'text'."},
    )
    head_projection_dim: int = field(
        default=2000,
        metadata={"help": "Random projection size of the 'ranpac' head (its Gram matrices take 8 * M^2 bytes each per "
                  "checkpoint, two with --head_ridge_choice seen: 64 MB for 2000; RanPAC uses 10000)."},
    )
    head_ridge_choice: str = field(
        default="seen",
        metadata={"help": "How the 'ranpac' head picks its ridge at each task: 'seen' (on a held-out fifth of every class "
                  "seen so far, kept as statistics; doubles the head's size) or 'task' (RanPAC's: on the current "
                  "task's hold-out alone, noisy for small tasks)."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the run writes: output_dir/task-<i> for every finished task (model, processor, "
                  "method state, card) and results.json. One run at a time: a second one is refused."},
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed of the run: LoRA initialisation, data order and every task (task t draws from a seed "
                  "made of this one and t). The recipes' class order has a seed of its own (see the recipe group), "
                  "and the inversion's seed defaults to this one."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "'true': continue the run in output_dir after its last finished task; a task-<i> folder: "
                  "continue after that task."},
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
        default="no", metadata={"help": "Must stay 'no': every finished task is saved as output_dir/task-<i> "
                                "(safetensors and JSON); the Trainer's mid-task checkpoints (pickles) are not written."}
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

    do_train: bool = field(
        default=True, metadata={"help": "Must stay True: a continual run learns its tasks (--method zero_shot "
                                "evaluates without training; `hf-pmi eval` scores a checkpoint)."}
    )

    def __post_init__(self):
        check_task_loop_arguments(self)  # before TrainingArguments' own checks: the reason, in the task loop's terms
        super().__post_init__()
        if self.dataloader_pin_memory and not _accelerator_available():
            self.dataloader_pin_memory = False  # pinned memory only helps copies to an accelerator (torch warns)
        self.method_given = self.method is not None  # a continued run keeps the checkpoint's method otherwise
        if self.method is None:
            self.method = DEFAULT_METHOD
        from .heads import RIDGE_CHOICES, check_head_name

        if self.head is not None:
            check_head_name(self.head)
        if self.head_ridge_choice not in RIDGE_CHOICES:
            raise ValueError(f"--head_ridge_choice must be one of {RIDGE_CHOICES}, got {self.head_ridge_choice!r}.")
        if self.head_projection_dim < 1:
            raise ValueError(f"--head_projection_dim must be >= 1, got {self.head_projection_dim}.")

        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the image column before the collator sees it; set it to False."
            )
