"""New classes from their names alone: semantic-aware projection (method.md, "new classes from names only").

A names-only class has no image. Its pseudo image features are built in the raw (pre-trained,
adapter-free) CLIP's feature space from old classes that are close in meaning (`projection`),
inverted through the raw CLIP, and trained on by a replay method (`learner`), with the settings of
`NamesOnlyConfig` (`config`).

Use: a `ContinualTasks` whose task is a `NamesOnlyTask` (`names_only_tasks(names)`, or
`make_names_only(tasks, task_ids)` to drop a split's training images), with ``method="pmi"``.
`ContinualTrainer.from_pretrained(repo, tasks=["purple ring"], ...)` adds classes by name to a
checkpoint, data-free.

Example:
    >>> from hf_pmi.names_only import NamesOnlyConfig, names_only_tasks
    >>> tasks = names_only_tasks(["purple ring"], config=NamesOnlyConfig(neighbours=3))
    >>> tasks[0].config.neighbours
    3
"""

from .config import BOUNDARY_KD, REFERENCE_PRESET, NamesOnlyConfig
from .learner import NamesOnlyLearner, check_bank, raw_clip, record_raw_gaussians, validate_tasks
from .projection import (boundary_target, nearest_classes, project_name, raw_text_prototypes, rotate_toward,
                         text_space_prototypes)
from .tasks import NamesOnlyTask, check_names, is_names_only, make_names_only, names_only_tasks

__all__ = [
    "BOUNDARY_KD", "REFERENCE_PRESET", "NamesOnlyConfig", "NamesOnlyLearner", "NamesOnlyTask", "boundary_target",
    "check_bank", "check_names", "is_names_only", "make_names_only", "names_only_tasks", "nearest_classes",
    "project_name", "raw_clip", "raw_text_prototypes", "record_raw_gaussians", "rotate_toward",
    "text_space_prototypes", "validate_tasks",
]
