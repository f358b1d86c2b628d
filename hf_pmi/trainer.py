"""`ContinualTrainer`: a `transformers.Trainer` that learns a sequence of class-incremental tasks.

For each task t: add its classes to the model -> ``method.before_task`` -> train (a fresh optimizer
and schedule) -> evaluate every seen task (a row of the accuracy matrix) -> ``method.after_task``
(statistics, feature bank, replay synthesis) -> write ``output_dir/task-{t}/`` and
``output_dir/results.json``. Task begin/end events reach callbacks that define
``on_task_begin`` / ``on_task_end``.

Example:
    >>> from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
    >>> from hf_pmi.testing import build_clip, build_processor, load_digits_dataset
    >>> tasks = split_class_incremental(load_digits_dataset(), num_tasks=2)
    >>> args = ContinualConfig(output_dir="/tmp/doc_run", method="finetune", max_steps=2, disable_tqdm=True)
    >>> trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=args, tasks=tasks,
    ...                            processing_class=build_processor())
    >>> result = trainer.train()
    >>> len(result.accuracy_matrix)
    2
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import Trainer

from .config import ContinualConfig
from .data import ContinualCollator, ContinualTasks
from .methods import METHODS
from .metrics import continual_metrics, format_matrix
from .modeling import ContinualCLIP

logger = logging.getLogger("hf_pmi")
STATE_NAME = "continual_state.json"
RESULTS_NAME = "results.json"


@dataclass
class ContinualResult:
    """What `ContinualTrainer.train` returns (and writes to ``results.json``)."""

    method: str
    seed: int
    class_order: list[int]
    class_names: list[str]
    accuracy_matrix: list[list[float | None]]
    counts: list[int]
    a_last: float
    a_avg: float
    forgetting: float
    bwt: float
    all_seen_accuracy: list[float]
    old_class_accuracy: list[float | None]
    new_class_accuracy: list[float]
    wall_seconds: float
    task_seconds: list[float] = field(default_factory=list)
    method_logs: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        return format_matrix(self.accuracy_matrix)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file


def latest_task_checkpoint(output_dir: str) -> str | None:
    """The folder of the last finished task under `output_dir` (None if there is none)."""
    if not os.path.isdir(output_dir):
        return None
    done = [
        int(name.split("-")[1])
        for name in os.listdir(output_dir)
        if name.startswith("task-") and name.split("-")[1].isdigit()
        and os.path.isfile(os.path.join(output_dir, name, STATE_NAME))
    ]
    return os.path.join(output_dir, f"task-{max(done)}") if done else None


class ContinualTrainer(Trainer):
    """Trains a `ContinualCLIP` on `ContinualTasks`, one task after another.

    Args:
        model: the `ContinualCLIP` to train (its classes grow with the tasks).
        args: a `ContinualConfig`; ``args.method`` picks the method from `hf_pmi.methods.METHODS`.
        tasks: from `split_class_incremental`.
        processing_class: a `CLIPProcessor` (image processor + tokenizer).
        inversion_config: settings of the replay synthesis (methods that invert the model).
    """

    def __init__(
        self,
        model: ContinualCLIP,
        args: ContinualConfig,
        tasks: ContinualTasks,
        processing_class,
        inversion_config=None,
        **kwargs,
    ):
        if not isinstance(args, ContinualConfig):
            raise TypeError(f"args must be a ContinualConfig, got {type(args).__name__}.")
        if not isinstance(model, ContinualCLIP):
            raise TypeError(
                f"model must be a ContinualCLIP, got {type(model).__name__}; wrap a CLIPModel with "
                f"`ContinualCLIP.from_clip(clip)`."
            )
        if not isinstance(tasks, ContinualTasks):
            raise TypeError("tasks must come from `split_class_incremental(...)`.")
        image_processor = getattr(processing_class, "image_processor", None)
        self.tokenizer_ = getattr(processing_class, "tokenizer", None)
        if image_processor is None or self.tokenizer_ is None:
            raise ValueError("processing_class must be a CLIPProcessor (with an image processor and a tokenizer).")
        collator = ContinualCollator(image_processor, tasks.label_map, tasks.image_column, tasks.label_column)
        super().__init__(model=model, args=args, data_collator=collator, processing_class=processing_class, **kwargs)
        self.tasks = tasks
        self.inversion_config = inversion_config
        self.method = METHODS[args.method](self)
        self.method.validate()
        if self.method.trains:
            streaming = [t.task_id for t in tasks if not hasattr(t.train, "__len__")]
            if streaming and args.max_steps <= 0:
                raise ValueError(
                    f"Tasks {streaming} stream their data (no length), so the Trainer cannot count epochs: set "
                    f"`max_steps` (steps per task)."
                )
        self.accuracy_matrix: list[list[float | None]] = []
        self.counts: list[int] = []
        self.task_seconds: list[float] = []
        self.method_logs: list[dict] = []

    # ----- the task loop -----------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> ContinualResult:
        """Learn every task in turn; `resume_from_checkpoint=True` continues after the last finished one."""
        start = 0
        if resume_from_checkpoint:
            folder = (
                latest_task_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is True
                else str(resume_from_checkpoint)
            )
            if folder is None:
                logger.warning("No finished task under %s: starting from task 0.", self.args.output_dir)
            else:
                start = self._load_task_checkpoint(folder) + 1
        wall = time.time()
        for t in range(start, len(self.tasks)):
            t0 = time.time()
            self._add_task_classes(t)
            self._task_event("on_task_begin", t)
            self.method.before_task(t)
            if self.method.trains:
                self.train_dataset = self.method.train_dataset(t)
                self.optimizer, self.lr_scheduler = None, None  # a fresh optimizer and schedule per task
                super().train(**kwargs)
            self._evaluate_seen_tasks(t)
            self.method_logs.append(self.method.after_task(t) or {})
            self.task_seconds.append(time.time() - t0)
            result = self.result(time.time() - wall)
            self._save_task(t, result)
            self.log({"task": t, "accuracy_all_seen": result.all_seen_accuracy[-1], **self.method_logs[-1]})
            self._task_event("on_task_end", t, result=result)
        return self.result(time.time() - wall)

    def _add_task_classes(self, t: int) -> None:
        task, model = self.tasks[t], self.model
        first, n = task.class_ids[0], len(task.class_ids)
        if model.class_names[first : first + n] == task.class_names:
            return  # already known (resumed run, or a model built with all class names)
        if model.num_classes != first:
            raise ValueError(
                f"Task {t} brings classes {task.class_ids} but the model knows {model.num_classes} classes; "
                f"the model's classes must be exactly those of the earlier tasks ({first})."
            )
        model.add_classes(task.class_names, self.tokenizer_)

    def _task_event(self, event: str, task_id: int, **kw) -> None:
        for callback in self.callback_handler.callbacks:
            fn = getattr(callback, event, None)
            if fn is not None:
                fn(self.args, self.state, self.control, task_id=task_id, trainer=self, **kw)

    # ----- loss and evaluation -----------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.method.compute_loss(model, inputs, num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            logits = model(pixel_values=inputs["pixel_values"]).logits
        return None, logits, inputs["labels"]

    def _evaluate_seen_tasks(self, t: int) -> None:
        test = self.tasks.seen_test(t)
        if test is None:
            self.accuracy_matrix.append([None] * len(self.tasks))
            return
        out = self.predict(test, metric_key_prefix=f"task{t}")
        pred, labels = np.asarray(out.predictions).argmax(-1), np.asarray(out.label_ids)
        task_of = np.zeros(self.model.num_classes, dtype=np.int64) - 1
        for task in self.tasks.tasks[: t + 1]:
            task_of[task.class_ids] = task.task_id
        owner = task_of[labels]
        row, counts = [], []
        for j in range(t + 1):
            mask = owner == j
            counts.append(int(mask.sum()))
            row.append(float((pred[mask] == labels[mask]).mean()) if mask.any() else None)
        padding = len(self.tasks) - t - 1  # entries for tasks not seen yet are None
        self.accuracy_matrix.append(row + [None] * padding)
        self.counts = [max(a, b) for a, b in zip(counts + [0] * padding, self.counts or [0] * len(self.tasks))]

    def result(self, wall_seconds: float = 0.0) -> ContinualResult:
        metrics = continual_metrics(self.accuracy_matrix, self.counts or None)
        return ContinualResult(
            method=self.args.method,
            seed=self.args.seed,
            class_order=self.tasks.class_order,
            class_names=self.tasks.class_names,
            accuracy_matrix=self.accuracy_matrix,
            counts=self.counts,
            wall_seconds=wall_seconds,
            task_seconds=self.task_seconds,
            method_logs=self.method_logs,
            **metrics,
        )

    # ----- checkpoints -------------------------------------------------------------------------
    def _save_task(self, t: int, result: ContinualResult) -> str:
        folder = os.path.join(self.args.output_dir, f"task-{t}")
        if self.is_world_process_zero():
            tmp = folder + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(tmp)
            self.processing_class.save_pretrained(tmp)
            self.method.save(tmp)
            state = {
                "task_id": t,
                "num_tasks": len(self.tasks),
                "method": self.args.method,
                "seed": self.args.seed,
                "tasks": self.tasks.describe(),
                "seen_classes": self.model.class_names,
                "method_info": self.method.card_info(),
                **result.to_dict(),
            }
            _write_json(os.path.join(tmp, STATE_NAME), state)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)  # the finished folder appears whole or not at all
            _write_json(os.path.join(self.args.output_dir, RESULTS_NAME), result.to_dict())
        self.accelerator.wait_for_everyone()
        return folder

    def _load_task_checkpoint(self, folder: str) -> int:
        with open(os.path.join(folder, STATE_NAME)) as f:
            state = json.load(f)
        if state["tasks"]["class_order"] != self.tasks.class_order:
            raise ValueError(
                f"{folder} was trained with class order {state['tasks']['class_order']}, but these tasks use "
                f"{self.tasks.class_order}: resume with the same data, seed and split."
            )
        model = ContinualCLIP.from_pretrained(folder).to(self.args.device)
        self.model = self.model_wrapped = model
        self.method.load(folder)
        self.accuracy_matrix = state["accuracy_matrix"]
        self.counts = state["counts"]
        self.task_seconds = state.get("task_seconds", [])
        self.method_logs = state.get("method_logs", [])
        logger.info("Resumed from %s (task %d finished).", folder, state["task_id"])
        return state["task_id"]
