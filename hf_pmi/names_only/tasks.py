"""Names-only tasks: a task given by class names alone (no training image), inside `ContinualTasks`.

Example:
    >>> tasks = names_only_tasks(["purple ring", "white cross"])
    >>> is_names_only(tasks[0]), tasks[0].train is None, tasks.class_names
    (True, True, ['purple ring', 'white cross'])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..data import ContinualTask, ContinualTasks, select_classes
from .config import NamesOnlyConfig


@dataclass
class NamesOnlyTask(ContinualTask):
    """A task given by class names only: ``train`` is None; ``test`` may hold real images to evaluate on."""

    config: NamesOnlyConfig = field(default_factory=NamesOnlyConfig)


def is_names_only(task) -> bool:
    """True for a task given by class names only."""
    return isinstance(task, NamesOnlyTask)


def check_names(names) -> list[str]:
    """Class names as a list of non-empty, distinct strings (raises `ValueError` naming the problem)."""
    if isinstance(names, str):
        raise ValueError(f"Give class names as a list, e.g. [{names!r}], not a single string.")
    names = list(names)
    if not names:
        raise ValueError("A names-only task needs at least one class name.")
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"Class names must be non-empty strings; got {n!r} in {names}.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Class name(s) {dup} appear more than once in {names}.")
    return names


def names_only_tasks(names, test=None, config: NamesOnlyConfig | None = None, label_column: str = "label",
                     image_column: str = "image") -> ContinualTasks:
    """One names-only task of `names`. `test` (optional) is a dataset whose `ClassLabel` names include
    `names`; its rows of these classes are used to evaluate the task."""
    names = check_names(names)
    order = list(range(len(names)))
    test_part = None
    if test is not None:
        label_names = list(test.features[label_column].names)
        missing = [n for n in names if n not in label_names]
        if missing:
            raise ValueError(f"The test data has no class(es) {missing}; its classes are {label_names}.")
        order = [label_names.index(n) for n in names]
        test_part = select_classes(test, label_column, order)
    task = NamesOnlyTask(task_id=0, class_ids=list(range(len(names))), class_names=names, train=None, test=test_part,
                         config=config or NamesOnlyConfig())
    return ContinualTasks(tasks=[task], class_order=order, class_names=names, image_column=image_column,
                          label_column=label_column, metadata={"names_only": True})


def make_names_only(tasks: ContinualTasks, task_ids=(-1,), config: NamesOnlyConfig | None = None) -> ContinualTasks:
    """`tasks` with the tasks `task_ids` turned names-only: their training images are dropped, their
    test images kept (the last task by default, as in the reference)."""
    chosen = {i % len(tasks) for i in task_ids}
    new = [
        NamesOnlyTask(t.task_id, t.class_ids, t.class_names, None, t.test, config or NamesOnlyConfig())
        if i in chosen else t
        for i, t in enumerate(tasks.tasks)
    ]
    return dataclasses.replace(tasks, tasks=new)


