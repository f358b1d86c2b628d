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
    with a single task they are 0.
    """
    A = accuracy_matrix
    T = len(A) - 1
    if T < 0:
        raise ValueError("The accuracy matrix is empty: evaluate at least one task first.")
    all_seen = [all_seen_accuracy(row, counts) for row in A]
    old = [all_seen_accuracy(row[:i], counts) if i else None for i, row in enumerate(A)]
    new = [row[i] for i, row in enumerate(A)]
    past = [j for j in range(T) if A[T][j] is not None and A[j][j] is not None]
    forgetting = (
        sum(max(A[i][j] for i in range(j, T) if A[i][j] is not None) - A[T][j] for j in past) / len(past)
        if past
        else 0.0
    )
    bwt = sum(A[T][j] - A[j][j] for j in past) / len(past) if past else 0.0
    return {
        "a_last": all_seen[-1],
        "a_avg": sum(all_seen) / len(all_seen),
        "forgetting": forgetting,
        "bwt": bwt,
        "all_seen_accuracy": all_seen,
        "old_class_accuracy": old,
        "new_class_accuracy": new,
    }


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
