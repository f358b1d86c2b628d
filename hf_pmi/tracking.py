"""One tracker run per task sequence, and the per-task continual metrics.

`Trainer.train()` runs once per task, and each run starts a fresh `TrainerState` at step 0 and
opens and closes every ``report_to`` tracker (one TensorBoard event file per task, all of them
drawn over the same steps). `ContinualCallbackHandler` replaces the trainer's callback handler and
gives the trackers (the callbacks of `transformers.integrations.INTEGRATION_TO_CALLBACK`) the view
of a single run:

- ``on_train_begin`` reaches them once, for the first task; ``on_train_end`` once, from `finish`
  after the last task (or after a crash);
- every other event reaches them with ``state.global_step`` shifted by the steps of the earlier
  tasks, so the global step keeps growing across tasks (the ``epoch`` stays the epoch within the
  task, and is sent once per step).

Other callbacks (progress bars, flow control, user callbacks) see the per-task state unchanged.

`task_metrics` turns a `ContinualResult` into the numbers logged after each task (``eval_``
prefixed, so trackers file them under ``eval/``): the accuracy-matrix row, A_last so far, A_avg,
forgetting, BWT, old/new-class accuracy and the method's numbers (e.g. the inversion cost).

Example:
    >>> from hf_pmi.tracking import task_metrics
    >>> from hf_pmi.checkpoint import ContinualResult
    >>> r = ContinualResult(method="pmi", seed=0, class_order=[0, 1], class_names=["a", "b"],
    ...                     accuracy_matrix=[[0.9, None], [0.7, 0.8]], counts=[10, 10], a_last=0.75, a_avg=0.825,
    ...                     forgetting=0.2, bwt=-0.2, all_seen_accuracy=[0.9, 0.75], old_class_accuracy=[None, 0.7],
    ...                     new_class_accuracy=[0.9, 0.8], wall_seconds=1.0, method_logs=[{}, {"inversion_seconds": 3.0}])
    >>> m = task_metrics(r, task_id=1, seen_classes=2)
    >>> m["eval_accuracy_task_0"], m["eval_a_last"], m["eval_inversion_seconds"]
    (0.7, 0.75, 3.0)
"""

from __future__ import annotations

import copy
import math

from transformers.trainer_callback import CallbackHandler


def _tracker_classes() -> tuple[type, ...]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return tuple(INTEGRATION_TO_CALLBACK.values())


class ContinualCallbackHandler(CallbackHandler):
    """A `CallbackHandler` under which the trackers see the whole task sequence as one run.

    Build it from the trainer's handler with `from_handler`; call `end_task(steps)` after each
    task and `finish(...)` once at the end (see the module docstring).
    """

    @classmethod
    def from_handler(cls, handler: CallbackHandler) -> "ContinualCallbackHandler":
        new = cls.__new__(cls)
        new.__dict__.update(handler.__dict__)  # same callbacks, model, optimizer, ... (no re-init warnings)
        new.step_offset = 0
        new.trackers_started = False
        new.finishing = False
        new._epoch_step = None
        new._trackers = _tracker_classes()
        return new

    def is_tracker(self, callback) -> bool:
        return isinstance(callback, self._trackers)

    def global_state(self, state):
        """`state` as the trackers see it: the step counted from the first task of the run."""
        view = copy.copy(state)
        view.global_step = state.global_step + self.step_offset
        return view

    def _dedupe_epoch(self, logs: dict, step: int) -> dict:
        """`Trainer.log` adds the epoch to every log; a step's second log (the end-of-training
        summary, the task metrics) drops it, so each tracker series has one value per step."""
        if "epoch" not in logs:
            return logs
        if self._epoch_step == step:
            return {k: v for k, v in logs.items() if k != "epoch"}
        self._epoch_step = step
        return logs

    def end_task(self, steps: int) -> None:
        """A task of `steps` optimizer steps ended: later steps count on from it.

        A task without training (a zero-shot method) still advances the step by one, so that every
        task's metrics have a step of their own.
        """
        self.step_offset += max(int(steps), 1)

    def finish(self, args, state, control):
        """Close the trackers' run (their deferred ``on_train_end``); safe to call more than once."""
        if not self.trackers_started:
            return control
        self.finishing = True
        try:
            control = self.call_event("on_train_end", args, state, control)
        finally:
            self.finishing, self.trackers_started = False, False
        return control

    def call_event(self, event, args, state, control, **kwargs):
        for callback in self.callbacks:
            view = state
            if self.is_tracker(callback):
                if event == "on_train_begin" and self.trackers_started:
                    continue  # the run is already open
                if event == "on_train_end" and not self.finishing:
                    continue  # more tasks follow
                view = self.global_state(state)
                if event == "on_log" and "logs" in kwargs:
                    kwargs = {**kwargs, "logs": self._dedupe_epoch(kwargs["logs"], view.global_step)}
            elif self.finishing:
                continue  # only the trackers get the deferred end of the run
            result = getattr(callback, event)(
                args,
                view,
                control,
                model=self.model,
                processing_class=self.processing_class,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader,
                **kwargs,
            )
            if result is not None:
                control = result
        if event == "on_train_begin":
            self.trackers_started = True
        return control


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def task_metrics(result, task_id: int, seen_classes: int) -> dict[str, float]:
    """The ``eval_``-prefixed numbers to log after global task `task_id` (see the module docstring).

    Cells of the accuracy-matrix row without data (tasks of a continued checkpoint) and NaN values
    are left out: trackers accept numbers only.
    """
    metrics: dict[str, float] = {"eval_task": task_id, "eval_seen_classes": seen_classes}
    for j, value in enumerate(result.accuracy_matrix[-1]):
        if _number(value):
            metrics[f"eval_accuracy_task_{j}"] = value
    summary = {
        "a_last": result.a_last,
        "a_avg": result.a_avg,
        "forgetting": result.forgetting,
        "bwt": result.bwt,
        "old_class_accuracy": result.old_class_accuracy[-1] if result.old_class_accuracy else None,
        "new_class_accuracy": result.new_class_accuracy[-1] if result.new_class_accuracy else None,
    }
    if result.task_seconds:
        summary["task_seconds"] = result.task_seconds[-1]
    if result.method_logs:
        summary.update(result.method_logs[-1])
    metrics.update({f"eval_{k}": v for k, v in summary.items() if _number(v)})
    return metrics


def summary_line(metrics: dict[str, float], num_tasks: int) -> str:
    """One console line for a finished task (printed whatever the progress-bar settings)."""

    def pct(key):
        return f"{100 * metrics[key]:.2f}" if key in metrics else "–"

    row = " ".join(f"{100 * v:.1f}" for k, v in metrics.items() if k.startswith("eval_accuracy_task_"))
    parts = [
        f"task {int(metrics['eval_task'])}/{num_tasks - 1} ({int(metrics['eval_seen_classes'])} classes seen):",
        f"A_last {pct('eval_a_last')}%",
        f"A_avg {pct('eval_a_avg')}%",
        f"forgetting {pct('eval_forgetting')}%",
        f"old {pct('eval_old_class_accuracy')}%",
        f"new {pct('eval_new_class_accuracy')}%",
    ]
    if "eval_inversion_seconds" in metrics:
        parts.append(f"inversion {metrics['eval_inversion_seconds']:.1f} s")
    return "  ".join(parts) + f"  | row: {row}"
