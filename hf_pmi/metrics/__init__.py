"""Continual-learning metrics over an accuracy matrix (definitions in `method.md`).

``A[i][j]`` is the accuracy on task j's classes after training task i (``None`` for j > i).
``counts[j]`` is the number of test examples of task j: the all-seen accuracy after task i is
pooled over examples, ``sum_j<=i A[i][j] * counts[j] / sum_j<=i counts[j]`` (tasks weigh equally
when counts are not given).

Example:
    >>> from hf_pmi.metrics import continual_metrics
    >>> m = continual_metrics([[0.9, None], [0.5, 0.8]])
    >>> round(m["a_last"], 3), round(m["forgetting"], 3), round(m["bwt"], 3)
    (0.65, 0.4, -0.4)

A continued checkpoint's run has no test data for the earlier tasks: they are listed in
``unevaluated_tasks``, A_last covers the evaluated tasks only (`a_last_scope` says which), and
forgetting and BWT are None when no earlier task was evaluated (not 0: nothing was measured).

    >>> m = continual_metrics([[None, None], [None, 0.8]])
    >>> m["a_last"], m["forgetting"], m["bwt"], m["unevaluated_tasks"]
    (0.8, None, None, [0])
"""

from __future__ import annotations


def all_seen_accuracy(row: list[float | None], counts: list[int] | None = None) -> float:
    """Accuracy over every seen task's examples, from one row of the accuracy matrix."""
    pairs = [(a, 1 if counts is None else counts[j]) for j, a in enumerate(row) if a is not None]
    total = sum(n for _, n in pairs)
    return sum(a * n for a, n in pairs) / total if total else float("nan")


def continual_metrics(accuracy_matrix: list[list[float | None]], counts: list[int] | None = None) -> dict:
    """A_last, A_avg, forgetting, BWT, and per-step all-seen / old-class / new-class accuracy.

    Forgetting and BWT are defined over tasks ``j < T`` (the last task cannot be forgotten yet);
    with a single task they are 0, and None when no earlier task was evaluated after the last one.
    ``unevaluated_tasks``: seen tasks without an accuracy after the last task (A_last does not cover them).
    """
    A = accuracy_matrix
    T = len(A) - 1
    if T < 0:
        raise ValueError("The accuracy matrix is empty: evaluate at least one task first.")
    # a BN-family continuation's rows start at its first task's column (the checkpoint's tasks have no row here)
    offset = max((j for j, a in enumerate(A[0]) if a is not None), default=0)

    def at(i: int, j: int) -> float | None:
        return A[i][j] if 0 <= j < len(A[i]) else None

    last = T + offset  # the column of the last task
    all_seen = [all_seen_accuracy(row, counts) for row in A]
    old = [all_seen_accuracy(row[: i + offset], counts) if i + offset else None for i, row in enumerate(A)]
    new = [at(i, i + offset) for i in range(len(A))]
    past = [j for j in range(last) if at(T, j) is not None and j >= offset and at(j - offset, j) is not None]
    unknown = None if last else 0.0  # no earlier task evaluated: nothing was measured (a single task: nothing to forget)
    forgetting = (
        sum(max(at(i, j) for i in range(j - offset, T) if at(i, j) is not None) - at(T, j) for j in past) / len(past)
        if past
        else unknown
    )
    bwt = sum(at(T, j) - at(j - offset, j) for j in past) / len(past) if past else unknown
    return {
        "a_last": all_seen[-1],
        "a_avg": sum(all_seen) / len(all_seen),
        "forgetting": forgetting,
        "bwt": bwt,
        "all_seen_accuracy": all_seen,
        "old_class_accuracy": old,
        "new_class_accuracy": new,
        "unevaluated_tasks": [j for j in range(last + 1) if at(T, j) is None],
    }


def a_last_scope(unevaluated_tasks: list[int] | None) -> str:
    """What A_last is measured over: all seen classes, or the evaluated tasks' classes only.

    Example:
        >>> a_last_scope([]), a_last_scope([0, 1])
        ('all seen classes', 'the evaluated tasks only: tasks 0, 1 were not evaluated (no test data for them in this run)')
    """
    if not unevaluated_tasks:
        return "all seen classes"
    return (f"the evaluated tasks only: task{'s' if len(unevaluated_tasks) > 1 else ''} "
            f"{', '.join(map(str, unevaluated_tasks))} {'were' if len(unevaluated_tasks) > 1 else 'was'} not "
            f"evaluated (no test data for them in this run)")


def format_metric(value, digits: int = 4) -> str:
    """A metric for a console line: the number, or "n/a" where it was not measured (None or NaN)."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def format_matrix(accuracy_matrix: list[list[float | None]], percent: bool = True) -> str:
    """The accuracy matrix as a plain-text table (rows: after task i; columns: task j)."""
    n = max(len(r) for r in accuracy_matrix)
    head = "after \\ on " + "".join(f"{'T' + str(j):>8}" for j in range(n))
    lines = [head]
    for i, row in enumerate(accuracy_matrix):
        cells = [("" if a is None else f"{a * 100:.1f}" if percent else f"{a:.3f}") for a in row]
        cells += [""] * (n - len(cells))
        lines.append(f"{'T' + str(i):<11}" + "".join(f"{c:>8}" for c in cells))
    return "\n".join(lines)
