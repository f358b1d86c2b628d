"""Accuracy per task from predictions: one row of the accuracy matrix.

Example:
    >>> import numpy as np
    >>> row, counts = task_accuracies(np.array([0, 1, 3, 2]), np.array([0, 0, 2, 2]), [[0, 1], [2, 3]])
    >>> row, counts
    ([0.5, 0.5], [2, 2])
"""

from __future__ import annotations

import numpy as np


def task_accuracies(pred, labels, task_classes: list[list[int]]) -> tuple[list[float | None], list[int]]:
    """Accuracy on each task's classes (None for a task without examples) and its number of examples."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    row, counts = [], []
    for ids in task_classes:
        mask = np.isin(labels, ids)
        counts.append(int(mask.sum()))
        row.append(float((pred[mask] == labels[mask]).mean()) if mask.any() else None)
    return row, counts
