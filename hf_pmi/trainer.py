"""`ContinualTrainer`: a `transformers.Trainer` that learns a sequence of class-incremental tasks.

For each task t: add its classes to the model -> ``method.before_task`` -> train (a fresh optimizer
and schedule) -> add the task's classes to the classifier head (`hf_pmi.trainer_heads`) -> evaluate every
seen task (a row of the accuracy matrix) -> ``method.after_task`` (statistics, feature bank, replay
synthesis) -> write ``output_dir/task-{t}/`` and ``output_dir/results.json``. Task begin/end events reach callbacks that define
``on_task_begin`` / ``on_task_end``.

The model's family (`hf_pmi.families`) provides the loop: this one for a `ContinualCLIP`; for an image
classifier with BatchNorm (any `AutoModelForImageClassification` model whose head is a final linear layer)
the BN family's (`hf_pmi.resnet.runner`), with the same tasks, folders, resume, Hub branches, callbacks and
trackers, settings in a ``ResNetContinualConfig`` (``method_config``).

Example:
    >>> from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
    >>> from hf_pmi.testing import build_clip, build_processor, load_digits_dataset
    >>> tasks = split_class_incremental(load_digits_dataset(), num_tasks=2)
    >>> args = ContinualConfig(output_dir="/tmp/doc_run", method="finetune", max_steps=2, disable_tqdm=True,
    ...                        overwrite_output_dir=True)
    >>> trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=args, tasks=tasks,
    ...                            processing_class=build_processor())
    >>> result = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    ...
    [hf_pmi] task 1/1 (10 classes seen): ...
    >>> len(result.accuracy_matrix), result.accuracy_matrix[0][1] is None
    (2, True)
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch
from transformers import Trainer, set_seed

from .checkpoint import (RESULTS_NAME, STATE_NAME, ContinualResult, latest_task_checkpoint, read_state,
                         task_folder_writer, write_json)
from .config import ContinualConfig
from .data import ContinualCollator, ContinualTasks, TaskPlan
from .evaluation import task_accuracies
from .families import family_for, family_for_checkpoint
from .guard import DivergenceGuard, check_loss, check_weights
from .hub import push_task_checkpoint
from .lock import RunLock
from .integrity import verify_checksums
from .log import get_logger, set_verbosity
from .methods import MethodConfig, method_class
from .metrics import continual_metrics
from .model_card import write_model_card
from .clip_checkpoint import task_file_checksums
from .modeling import ContinualCLIP
from .names_only import is_names_only, names_only_tasks
from .resolve import resolve_pretrained_folder
from .resume import (
    check_resume_consistency, check_same_model, dataset_fingerprint, prepare_output_dir, restore_trainable,
    resume_request, trainable_parameter_names,
)
from .seeding import task_seed
from .tracking import ContinualCallbackHandler, summary_line, task_metrics
from .trainer_heads import ContinualHeadMixin
from .trainer_hub import ContinualHubMixin, card_state, continued_args
from .validation import (check_checkpoint_prompts, check_distinct_prompts, check_output_dir_writable,
                         check_processor_fits, check_same_processor, check_templates, check_training_settings,
                         refuse_known_classes)

logger = get_logger()
__all__ = ["ContinualResult", "ContinualTrainer", "latest_task_checkpoint"]


class ContinualTrainer(ContinualHeadMixin, ContinualHubMixin, Trainer):
    """Trains a `ContinualCLIP` (or an image classifier with BatchNorm) on `ContinualTasks`, one task after another.

    Args:
        model: the `ContinualCLIP` to train (its classes grow with the tasks), or an image classifier with
            BatchNorm whose head grows (see the module docstring; methods finetune, lwf, pmi, full_inversion,
            exemplar_replay).
        args: a `ContinualConfig`; ``args.method`` picks the method from `hf_pmi.methods.METHODS`.
        tasks: from `split_class_incremental`.
        processing_class: a `CLIPProcessor` (image processor + tokenizer); for an image classifier, an
            image processor (its mean and std; default ImageNet's) or None.
        method_config: the settings of ``args.method``, an instance of its config class
            (``hf_pmi.methods.METHODS[args.method].config_class``, e.g. `hf_pmi.methods.pmi.PMIConfig`);
            default: that class's defaults. For an image classifier: a `ResNetContinualConfig`.
    """

    def __init__(
        self,
        model: ContinualCLIP,
        args: ContinualConfig,
        tasks: ContinualTasks,
        processing_class,
        method_config: MethodConfig | None = None,
        **kwargs,
    ):
        if not isinstance(args, ContinualConfig):
            raise TypeError(f"args must be a ContinualConfig, got {type(args).__name__}.")
        if not isinstance(tasks, ContinualTasks):
            raise TypeError("tasks must come from `split_class_incremental(...)`.")
        self.family = family_for(model)  # the family's hooks run the rest (hf_pmi.families)
        self.family_run = None  # what the family keeps for the run (the BN family: its `BNRun`)
        self.family.setup(self, model, args, tasks, processing_class, method_config, **kwargs)

    def init_trainer(self, **kwargs) -> None:
        """`transformers.Trainer.__init__` (for a family's `setup`)."""
        super().__init__(**kwargs)

    def _setup_clip(self, model, args, tasks, processing_class, method_config, **kwargs) -> None:
        """The CLIP family's setup: the method, the collator, the head and every check before any work."""
        method_cls = method_class(args.method)  # an unknown name fails before any work
        check_output_dir_writable(args.output_dir)  # before the Trainer creates it (it would fail unclearly)
        image_processor = getattr(processing_class, "image_processor", None)
        if image_processor is None or getattr(processing_class, "tokenizer", None) is None:
            raise ValueError("processing_class must be a CLIPProcessor (with an image processor and a tokenizer).")
        collator = ContinualCollator(image_processor, tasks.label_map, tasks.image_column, tasks.label_column)
        super().__init__(model=model, args=args, data_collator=collator, processing_class=processing_class, **kwargs)
        set_verbosity(args.get_process_log_level())  # the hf_pmi logger follows log_level, as transformers' does
        self.callback_handler = ContinualCallbackHandler.from_handler(self.callback_handler)  # one tracker run
        self.tasks = tasks
        self.method = method_cls(self, method_config)
        self._validate()  # every setting and input, before any work
        self._setup_head()
        self._run_lock = RunLock(args.output_dir)
        self._on_main_process(self._run_lock.check)  # another run writing to output_dir: refused before any work
        self.dataset_fingerprint = dataset_fingerprint(tasks)
        self.current_task = None  # global index of the task being learnt (divergence errors name it)
        self.add_callback(DivergenceGuard(self))
        if self.method.trains:
            streaming = [t.task_id for t in tasks if t.train is not None and not hasattr(t.train, "__len__")]
            if streaming and args.max_steps <= 0:
                raise ValueError(
                    f"Tasks {streaming} stream their data (no length), so the Trainer cannot count epochs: set "
                    f"`max_steps` (steps per task)."
                )
        self._pushes = []
        self.failed_pushes: list = []  # PushResults of the pushes that failed (their retry_command redoes them)
        self._previous_task_classes: list[list[int]] = []
        self.accuracy_matrix: list[list[float | None]] = []
        self.counts: list[int] = []
        self.task_seconds: list[float] = []
        self.method_logs: list[dict] = []

    def _validate(self) -> None:
        """Everything that can be checked before the first step (settings, model, tasks, the method's own)."""
        check_training_settings(self.args, trains=self.method.trains)
        model = self.accelerator.unwrap_model(self.model)
        check_templates(model.templates)
        check_checkpoint_prompts(model.class_names, model.templates, model.prompt_ids, "The model")
        check_processor_fits(self.processing_class.image_processor, model.clip_config.vision_config.image_size)
        names = model.class_names + [n for n in self.tasks.class_names if n not in model.class_names]
        check_distinct_prompts(names, model.tokenize_classes(names, self.processing_class.tokenizer)[0],
                               model.prompt_ids.shape[-1])  # every task's classes, not only the first task's
        if any(is_names_only(t) for t in self.tasks) and not self.method.learns_from_names:
            raise ValueError(
                f"Names-only tasks are learned by inverting projected features: use method='pmi' (got "
                f"{self.args.method!r})."
            )
        self.method.validate()

    # ----- the task loop -----------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> ContinualResult:
        """Learn every task in turn; `resume_from_checkpoint=True` continues after the last finished one.

        Without the argument, ``args.resume_from_checkpoint`` is used ("true" or a task folder), so
        ``--resume_from_checkpoint true`` works in every recipe. An `output_dir` holding finished
        tasks is refused unless resuming or ``args.overwrite_output_dir``.
        """
        return self.family.train(self, resume_from_checkpoint, **kwargs)

    def _train_clip(self, resume_from_checkpoint, **kwargs) -> ContinualResult:
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        resume_from_checkpoint = resume_request(resume_from_checkpoint)
        self._on_main_process(self._run_lock.acquire)  # one writer per output_dir (hf_pmi.lock)
        try:
            return self._train_tasks(resume_from_checkpoint, **kwargs)
        finally:
            if self.is_world_process_zero():
                self._run_lock.release()

    def _train_tasks(self, resume_from_checkpoint: bool | str | None, **kwargs) -> ContinualResult:
        self._on_main_process(lambda: prepare_output_dir(self.args.output_dir, resume_from_checkpoint,
                                                         self.args.overwrite_output_dir))
        self.accelerator.wait_for_everyone()
        start, elapsed = 0, 0.0
        if resume_from_checkpoint:
            folder = (
                latest_task_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is True
                else str(resume_from_checkpoint)
            )
            if folder is None:
                logger.warning("No finished task under %s: starting from task 0.", self.args.output_dir)
            else:
                start = self._load_task_checkpoint(folder) + 1 - self.tasks.task_offset
                elapsed = self._resumed_wall_seconds
        wall = time.time() - elapsed  # a resumed run goes on counting its wall time
        try:
            for t in range(start, len(self.tasks)):
                t0 = time.time()
                self.current_task = self.tasks.task_offset + t
                set_seed(task_seed(self.args.seed, self.current_task))  # a resumed task draws the same numbers
                self._add_task_classes(t)
                self._task_event("on_task_begin", t)
                self.method.before_task(t)
                if self.method.trains_task(t):
                    with self._task_scope(self.method.plan_task(t)):
                        self.optimizer, self.lr_scheduler = None, None  # a fresh optimizer and schedule per task
                        super().train(**kwargs)
                    check_weights(self.accelerator.unwrap_model(self.model), self.current_task, "after training")
                self._update_head(t)
                self._evaluate_seen_tasks(t)
                self.method_logs.append(self.method.after_task(t) or {})
                self.task_seconds.append(time.time() - t0)
                result = self.result(time.time() - wall)
                self._log_task(t, result)
                self._save_task(t, result)
                self._task_event("on_task_end", t, result=result)
        finally:  # close the trackers' run, also on a crash (they flush at every log)
            self.callback_handler.finish(self.args, self.state, self.control)
        self._wait_for_pushes()
        return self.result(time.time() - wall)

    def _on_main_process(self, fn) -> None:
        """Run `fn` on the main process only; an error there stops every process (none waits for it forever)."""
        error = None
        if self.is_world_process_zero():
            try:
                fn()
            except Exception as e:
                error = e
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            message = broadcast_object_list([None if error is None else f"{type(error).__name__}: {error}"])[0]
            if message and error is None:
                raise RuntimeError(f"The main process stopped the run: {message}")
        if error is not None:
            raise error

    @contextlib.contextmanager
    def _task_scope(self, plan: TaskPlan):
        """Train on `plan` (its dataset, collator and per-task `TrainingArguments` values); everything it
        changes is restored on exit, also when the task fails."""
        saved_args = {name: getattr(self.args, name) for name in plan.overrides}
        unknown = [name for name in plan.overrides if not hasattr(self.args, name)]
        if unknown:
            raise ValueError(f"The task plan sets unknown training arguments {unknown}.")
        saved = (self.train_dataset, self.data_collator)
        try:
            for name, value in plan.overrides.items():
                setattr(self.args, name, value)
            self.train_dataset = plan.train_dataset
            if plan.collator is not None:
                self.data_collator = plan.collator
            yield
        finally:
            for name, value in saved_args.items():
                setattr(self.args, name, value)
            self.train_dataset, self.data_collator = saved

    def _log_task(self, t: int, result: ContinualResult) -> None:
        """Per-task metrics to every tracker (one run, a growing step), `save_metrics` and the console."""
        g = self.tasks.task_offset + t
        metrics = task_metrics(result, g, self.model.num_classes)
        self.log(dict(metrics))
        self.callback_handler.end_task(self.state.global_step if self.method.trains else 0)
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            self.save_metrics("eval", metrics)
            print(f"[hf_pmi] {summary_line(metrics, self.num_total_tasks)}", flush=True)

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
        model.add_classes(task.class_names, self.processing_class.tokenizer)

    def _task_event(self, event: str, task_id: int, **kw) -> None:  # callbacks' on_task_begin / on_task_end
        for fn in filter(None, (getattr(c, event, None) for c in self.callback_handler.callbacks)):
            fn(self.args, self.state, self.control, task_id=task_id, trainer=self, **kw)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str,
        tasks: ContinualTasks | list[str],
        args: ContinualConfig,
        revision: str | None = None,
        processing_class=None,
        **kwargs,
    ) -> "ContinualTrainer":
        """Continue learning from a finished task's checkpoint (local folder, or Hub repo + revision).

        Loads the model, processor, feature bank and state; `tasks` (new classes only, e.g. from
        `split_class_incremental(new_data, ...)`) are renumbered to follow the checkpoint's classes
        and tasks. Old classes are replayed from the bank: no old data is needed. A list of class
        names instead of tasks adds those classes from their names only (`hf_pmi.names_only`;
        method "pmi" on a LoRA checkpoint), with no image at all.

        Example:
            >>> trainer = ContinualTrainer.from_pretrained("me/clip-cub200-pmi", tasks=new_tasks, args=args,
            ...                                            revision="task-9")  # doctest: +SKIP
        """
        folder = resolve_pretrained_folder(path_or_repo_id, revision=revision)
        state = read_state(folder)
        return family_for_checkpoint(state).continue_from(cls, folder, state, path_or_repo_id, tasks, args,
                                                          processing_class, **kwargs)

    @classmethod
    def _continue_clip(cls, folder, state, path_or_repo_id, tasks, args, processing_class=None, **kwargs):
        """`from_pretrained` for a CLIP task folder."""
        if not isinstance(tasks, ContinualTasks):  # class names only: learned data-free (hf_pmi.names_only)
            tasks = names_only_tasks(tasks)
        verify_checksums(folder, state.get("checksums"))
        model = ContinualCLIP.from_pretrained(folder)
        restore_trainable(model, state.get("trainable_parameters"), folder)
        refuse_known_classes(model.class_names, tasks, path_or_repo_id)
        check_same_processor(folder, processing_class, path_or_repo_id)  # another size/normalisation: refused
        if processing_class is None:
            from transformers import AutoProcessor

            processing_class = AutoProcessor.from_pretrained(folder)
        done = state["task_id"] + 1
        args = continued_args(args, state, path_or_repo_id)
        trainer = cls(model=model, args=args, tasks=tasks.continuing(model.num_classes, done),
                      processing_class=processing_class, **kwargs)
        trainer._previous_task_classes = state["task_classes"]
        trainer.callback_handler.step_offset = state.get("global_step", 0)  # trackers' steps go on from the checkpoint
        # rows of a run that planned more tasks than it finished are cut to the finished ones
        trainer.accuracy_matrix = [row[:done] + [None] * len(tasks) for row in state["accuracy_matrix"]]
        trainer.counts = state["counts"][:done] + [0] * len(tasks)
        trainer.method.load(folder)
        return trainer

    # ----- loss and evaluation -----------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.method.compute_loss(model, inputs, num_items_in_batch)
        check_loss(loss, self.current_task, self.state.global_step + 1)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            logits = model(pixel_values=inputs["pixel_values"]).prediction_logits  # routed where the model routes
        return None, logits, inputs["labels"]

    @property
    def num_total_tasks(self) -> int:
        """Tasks of the whole sequence, including those of a continued checkpoint."""
        return self.tasks.task_offset + len(self.tasks)

    def _evaluate_seen_tasks(self, t: int) -> None:
        test = self.tasks.seen_test(t)
        if test is None:
            self.accuracy_matrix.append([None] * self.num_total_tasks)
            return
        out = self.predict(test, metric_key_prefix=f"task{t}")
        pred, labels = np.asarray(out.predictions).argmax(-1), np.asarray(out.label_ids)
        row, counts = task_accuracies(pred, labels, [task.class_ids for task in self.tasks.tasks[: t + 1]])
        # earlier tasks of a continued checkpoint have no data here; tasks not seen yet are None
        before, after = [None] * self.tasks.task_offset, [None] * (len(self.tasks) - t - 1)
        self.accuracy_matrix.append(before + row + after)
        counts = [0] * self.tasks.task_offset + counts + [0] * len(after)
        self.counts = [max(a, b) for a, b in zip(counts, self.counts or [0] * self.num_total_tasks)]

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
        g = self.tasks.task_offset + t  # task index in the whole sequence (continued runs go on counting)
        folder = os.path.join(self.args.output_dir, f"task-{g}")
        model = self.accelerator.unwrap_model(self.model)
        check_weights(model, g, "before saving its checkpoint")  # never write a non-finite checkpoint
        if self.is_world_process_zero():
            with task_folder_writer(self.args.output_dir, g) as tmp:  # the folder appears whole or not at all
                self._write_task(tmp, g, model, result)
            write_json(os.path.join(self.args.output_dir, RESULTS_NAME), result.to_dict())
            if self.args.push_to_hub:
                self._pushes.append(
                    push_task_checkpoint(folder, self.hub_model_id, g, token=self.args.hub_token, run_as_future=True)
                )
        self.accelerator.wait_for_everyone()
        return folder

    def _write_task(self, tmp: str, g: int, model, result: ContinualResult) -> None:
        """Fill a task folder being written: the model and processor, the method's files, the state, the card."""
        model.save_pretrained(tmp, processor=self.processing_class)
        self.method.save(tmp)
        state = {
            "task_id": g,
            "num_tasks": self.num_total_tasks,
            "method": self.args.method,
            "seed": self.args.seed,
            "tasks": self.tasks.describe(),
            "seen_classes": self.model.class_names,
            "task_classes": self._task_classes(g),
            "method_info": self.method.card_info(),
            "trainable_parameters": trainable_parameter_names(model),
            "dataset_fingerprint": self.dataset_fingerprint,
            "checksums": task_file_checksums(tmp),  # every safetensors and JSON file, verified on every load
            "global_step": self.callback_handler.step_offset,  # trackers' step after this task
            **result.to_dict(),
        }
        write_json(os.path.join(tmp, STATE_NAME), state)
        write_model_card(tmp, card_state(self, g, result, tmp))  # after save_pretrained: peft writes a README

    def _task_classes(self, g: int) -> list[list[int]]:
        """Class ids of every task up to global task `g` (a continued checkpoint's tasks first)."""
        return (self._previous_task_classes + [t.class_ids for t in self.tasks])[: g + 1]

    def _load_task_checkpoint(self, folder: str) -> int:
        if not os.path.isfile(os.path.join(folder, STATE_NAME)):
            raise FileNotFoundError(
                f"No finished task checkpoint at {folder} (no {STATE_NAME}). Pass the task-N folder of a finished "
                f"task, or resume_from_checkpoint=True for the latest one in output_dir."
            )
        state = read_state(folder)
        check_resume_consistency(state, self, folder)
        verify_checksums(folder, state.get("checksums"))
        check_same_model(self.accelerator.unwrap_model(self.model), folder)
        model = ContinualCLIP.from_pretrained(folder).to(self.args.device)
        restore_trainable(model, state.get("trainable_parameters"), folder)
        self.model = self.model_wrapped = model
        self.method.load(folder)
        self.accuracy_matrix = state["accuracy_matrix"]
        self.counts = state["counts"]
        self._previous_task_classes = state["task_classes"][: self.tasks.task_offset]
        self.task_seconds = state.get("task_seconds", [])
        self.method_logs = state.get("method_logs", [])
        self._resumed_wall_seconds = float(state.get("wall_seconds", 0.0))
        self.callback_handler.step_offset = state.get("global_step", 0)
        logger.info("Resumed from %s (task %d finished).", folder, state["task_id"])
        if self.is_world_process_zero():  # announced like the task lines: the run does not start from scratch
            print(f"[hf_pmi] Resuming from {folder}: {state['task_id'] + 1} of {self.num_total_tasks} tasks "
                  f"finished, continuing with task {state['task_id'] + 1}.", flush=True)
        return state["task_id"]
