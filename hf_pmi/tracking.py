"""One tracker run per task sequence, and the per-task continual metrics.

`Trainer.train()` runs once per task, and each run starts a fresh `TrainerState` at step 0 and
opens and closes every ``report_to`` tracker (one TensorBoard event file per task, all of them
drawn over the same steps). `ContinualCallbackHandler` wraps the trainer's callback handler and puts
each tracker (the callbacks of `transformers.integrations.INTEGRATION_TO_CALLBACK`) behind a
`TrackerProxy`, a plain `TrainerCallback`, which gives it the view of a single run:

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

from transformers import TrainerCallback


def _tracker_classes() -> tuple[type, ...]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return tuple(INTEGRATION_TO_CALLBACK.values())


class _RunView:
    """What the tracker proxies of one trainer share: the step offset and whether the trackers' run is open."""

    def __init__(self):
        self.step_offset = 0
        self.trackers_started = False
        self.finishing = False
        self.epoch_step = None
        self.last_kwargs: dict = {}  # the handler's keyword arguments (model, optimizer, ...) of the latest event


class TrackerProxy(TrainerCallback):
    """A `TrainerCallback` standing in for a tracker (TensorBoard, W&B, ...) in the trainer's own handler, so
    that the tracker sees the whole task sequence as one run (module docstring): ``on_train_begin`` once,
    ``on_train_end`` only from `ContinualCallbackHandler.finish`, every state with the global step."""

    def __init__(self, tracker: TrainerCallback, view: _RunView):
        self.tracker, self.view = tracker, view

    def __getattr__(self, name):  # anything else (e.g. a tracker's own attributes) is the tracker's
        if name in ("tracker", "view"):
            raise AttributeError(name)
        return getattr(self.tracker, name)

    def _forward(self, event: str, args, state, control, **kwargs):
        view = self.view
        view.last_kwargs = {k: v for k, v in kwargs.items() if k != "logs"}
        if event == "on_train_begin" and view.trackers_started:
            return None  # the run is already open
        if event == "on_train_end" and not view.finishing:
            return None  # more tasks follow
        shown = copy.copy(state)
        shown.global_step = state.global_step + view.step_offset
        if event == "on_log" and "logs" in kwargs:
            kwargs = {**kwargs, "logs": self._dedupe_epoch(kwargs["logs"], shown.global_step)}
        return getattr(self.tracker, event)(args, shown, control, **kwargs)

    def _dedupe_epoch(self, logs: dict, step: int) -> dict:
        """`Trainer.log` adds the epoch to every log; a step's second log (the end-of-training
        summary, the task metrics) drops it, so each tracker series has one value per step."""
        if "epoch" not in logs:
            return logs
        if self.view.epoch_step == step:
            return {k: v for k, v in logs.items() if k != "epoch"}
        self.view.epoch_step = step
        return logs


def _proxy_event(event: str):
    def handler(self, args, state, control, **kwargs):
        return self._forward(event, args, state, control, **kwargs)

    handler.__name__ = event
    return handler


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_")]:
    setattr(TrackerProxy, _event, _proxy_event(_event))


class ContinualCallbackHandler:
    """The trainer's own `CallbackHandler` with its trackers behind `TrackerProxy` objects, plus the step
    offset of the task sequence. Everything else (events, callbacks, ``add_callback``, the model and
    optimizer it passes on) is the wrapped handler's.

    Build it with `from_handler`; call `end_task(steps)` after each task and `finish(...)` once at the end
    (see the module docstring).
    """

    _OWN = ("handler", "view")

    @classmethod
    def from_handler(cls, handler) -> "ContinualCallbackHandler":
        if isinstance(handler, ContinualCallbackHandler):
            return handler
        new = cls.__new__(cls)
        object.__setattr__(new, "handler", handler)
        object.__setattr__(new, "view", _RunView())
        trackers = _tracker_classes()
        handler.callbacks = [TrackerProxy(cb, new.view) if isinstance(cb, trackers) else cb for cb in handler.callbacks]
        return new

    def __getattr__(self, name):
        return getattr(self.handler, name)

    def __setattr__(self, name, value):  # the Trainer sets model, optimizer, dataloaders on its handler
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.handler, name, value)

    @property
    def step_offset(self) -> int:
        """Optimizer steps of the finished tasks (the trackers' steps count on from it)."""
        return self.view.step_offset

    @step_offset.setter
    def step_offset(self, value: int) -> None:
        self.view.step_offset = int(value)

    def is_tracker(self, callback) -> bool:
        return isinstance(callback, TrackerProxy)

    def end_task(self, steps: int) -> None:
        """A task of `steps` optimizer steps ended: later steps count on from it.

        A task without training (a zero-shot method) still advances the step by one, so that every
        task's metrics have a step of their own.
        """
        self.view.step_offset += max(int(steps), 1)

    def call_event(self, event, args, state, control, **kwargs):
        control = self.handler.call_event(event, args, state, control, **kwargs)
        if event == "on_train_begin":
            self.view.trackers_started = True
        return control

    def on_train_begin(self, args, state, control):
        control = self.handler.on_train_begin(args, state, control)
        self.view.trackers_started = True
        return control

    def finish(self, args, state, control):
        """Close the trackers' run (their deferred ``on_train_end``); safe to call more than once."""
        view = self.view
        if not view.trackers_started:
            return control
        view.finishing = True
        try:
            for callback in self.handler.callbacks:
                if isinstance(callback, TrackerProxy):
                    result = callback.on_train_end(args, state, control, **view.last_kwargs)
                    control = result if result is not None else control
        finally:
            view.finishing, view.trackers_started = False, False
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
