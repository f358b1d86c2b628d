"""Every seed a run derives from its ``--seed``, in one place.

A run is reproducible when each source of randomness has a seed of its own that depends only on
the run's seed and where it is used: the task (so that a resumed task draws what an uninterrupted
run draws), the process (so that shards do not repeat each other's noise) and the purpose.

Example:
    >>> task_seed(42, 3), replay_seed(42, 3, rank=1), rank_seed(5, rank=2)
    (42003, 42031, 15843)
"""

from __future__ import annotations

# 1000 tasks per run seed: the seeds of two runs' tasks never meet (runs have far fewer tasks).
TASKS_PER_SEED = 1000
# 10 processes per task: replay draws of different processes and tasks never meet (10 > processes used).
PROCESSES_PER_TASK = 10
# A prime stride between processes' inversion starts: ranks never reuse a neighbour's stream.
RANK_STRIDE = 7919


def task_seed(seed: int, task: int) -> int:
    """The seed every task starts from (torch, numpy and Python generators are reset to it)."""
    return int(seed) * TASKS_PER_SEED + int(task)


def replay_seed(seed: int, task: int, rank: int = 0) -> int:
    """The generator of the replay draws of one process in one task (which samples join each batch)."""
    return task_seed(seed, PROCESSES_PER_TASK * int(task) + int(rank))


def rank_seed(seed: int, rank: int) -> int:
    """A process's share of a seed (inversion starts differ between processes, targets do not)."""
    return int(seed) + RANK_STRIDE * int(rank)


def names_only_inversion_seed(seed: int, task: int) -> int:
    """The random starts of the inversion of a names-only task's projected features."""
    return int(seed) + 17 * int(task)  # 17: a stride that keeps tasks apart within the run's seed


def shuffle_seed(seed: int) -> int:
    """The order in which a synthesis's targets are cut into inversion batches."""
    return int(seed) + 104_729  # a prime offset: a stream apart from the run's other uses of the seed


def class_seed(seed: int, class_id: int) -> int:
    """The generator of one class's targets: (seed, class) only, so sharding never changes them."""
    return int(seed) * 1_000_003 + int(class_id)  # a prime above any class count
