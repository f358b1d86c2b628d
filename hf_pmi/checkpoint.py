"""The layout of a continual run's output folder, and what a finished task records.

``output_dir/task-{t}/`` holds a finished task (the model, processor, method state, card) and its
``continual_state.json`` (`STATE_NAME`): class order, accuracy matrix so far, settings, checksums.
A task folder without that file is not finished. ``output_dir/results.json`` (`RESULTS_NAME`)
holds the latest `ContinualResult`. JSON is written atomically (a crash never leaves half a file).

Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> latest_task_checkpoint(out) is None
    True
    >>> os.makedirs(os.path.join(out, "task-0")); write_json(os.path.join(out, "task-0", STATE_NAME), {"task_id": 0})
    >>> os.path.basename(latest_task_checkpoint(out)), read_state(latest_task_checkpoint(out))["task_id"]
    ('task-0', 0)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field

from .integrity import read_json, verify_checksums
from .integrity import write_json as integrity_write_json
from .metrics import format_matrix

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
    forgetting: float | None  # None: no earlier task was evaluated (a continued checkpoint's run)
    bwt: float | None
    all_seen_accuracy: list[float]
    old_class_accuracy: list[float | None]
    new_class_accuracy: list[float]
    wall_seconds: float
    task_seconds: list[float] = field(default_factory=list)
    method_logs: list[dict] = field(default_factory=list)
    unevaluated_tasks: list[int] = field(default_factory=list)  # seen tasks A_last does not cover

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        return format_matrix(self.accuracy_matrix)

    @classmethod
    def from_state(cls, state: dict) -> "ContinualResult":
        """The result recorded in a task's ``continual_state.json``."""
        from dataclasses import fields

        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


def write_json(path: str, obj) -> None:
    """Write `obj` as JSON to `path` atomically (a temporary file renamed into place). A task state
    (``continual_state.json``) is sealed: it records its own sha256, verified whenever it is read
    (`hf_pmi.integrity.read_json`), since it lists the checksums of every other file."""
    integrity_write_json(path, obj, seal=os.path.basename(path) == STATE_NAME)


@contextlib.contextmanager
def task_folder_writer(output_dir: str, task_id: int):
    """The one writer of a finished task's folder, for every family: yields ``output_dir/task-{t}.tmp`` to fill,
    then renames it to ``task-{t}`` (replacing an older one), so a crash leaves the whole task or none of it (a
    half-written ``.tmp`` is overwritten next time). Nothing is renamed if filling it fails.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> with task_folder_writer(out, 3) as tmp:
        ...     write_json(os.path.join(tmp, "x.json"), {})
        >>> sorted(os.listdir(out)), os.listdir(os.path.join(out, "task-3"))
        (['task-3'], ['x.json'])
    """
    folder = os.path.join(output_dir, f"task-{task_id}")
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # the finished folder appears whole or not at all


def read_state(folder: str) -> dict:
    """The ``continual_state.json`` of a finished task folder (a truncated file raises
    `hf_pmi.integrity.CheckpointFileError` naming it)."""
    return read_json(os.path.join(folder, STATE_NAME))


def task_checksums(folder: str) -> dict[str, str] | None:
    """The checksums a finished task recorded for the files under `folder` (relative to it), where `folder`
    is a task folder or one of its subfolders (e.g. its ``feature_bank/``); None outside a task folder."""
    task, prefix = folder, ""
    if not os.path.isfile(os.path.join(folder, STATE_NAME)):
        task, sub = os.path.split(os.path.normpath(folder))
        prefix = sub + "/"
        if not os.path.isfile(os.path.join(task, STATE_NAME)):
            return None
    recorded = read_state(task).get("checksums") or {}
    return {rel[len(prefix):]: digest for rel, digest in recorded.items() if rel.startswith(prefix)}


def verify_task_folder(path_or_repo_id, revision: str | None = None, *, token=None, cache_dir=None,
                       subfolder: str | None = None) -> bool:
    """Verify what a model loader reads from a finished task folder (a local folder or a Hub repo at
    `revision`) against the checksums its ``continual_state.json`` records: ``config.json`` (classes,
    ``id2label``), the weights and ``preprocessor_config.json``, and the state itself (it is sealed).
    Returns False, checking nothing, where there is no task state (a plain model folder or repo).

    hf_pmi's own loaders call it (e.g. `hf_pmi.resnet.ResNet32ForImageClassification.from_pretrained`,
    which ``AutoModelForImageClassification`` and ``pipeline("image-classification", ...)`` use). Call it
    before loading a task folder with a class hf_pmi does not own (e.g. transformers' ``ResNetForImageClassification``).

    Raises:
        hf_pmi.integrity.ChecksumError: a file differs from the one written with the task, naming it and the fix.

    Example:
        >>> verify_task_folder("runs/task-3")  # doctest: +SKIP
        True
    """
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isfile(os.path.join(folder, STATE_NAME)):
            return False
        recorded = read_state(folder).get("checksums") or {}
        verify_checksums(folder, {rel: digest for rel, digest in recorded.items() if "/" not in rel})
        return True
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HFValidationError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir, "subfolder": subfolder}
    try:
        state_file = hf_hub_download(path, STATE_NAME, **kwargs)
    except (EntryNotFoundError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError):
        return False  # not a task of an hf_pmi run, or no such repo: the model loader says what is wrong
    folder = os.path.dirname(state_file)
    recorded = {rel: digest for rel, digest in (read_state(folder).get("checksums") or {}).items()
                if "/" not in rel and not rel.startswith("replay_state")}  # what a model loader reads
    for rel in recorded:
        try:
            hf_hub_download(path, rel, **kwargs)  # into the same snapshot; the model loader reuses it
        except EntryNotFoundError:
            pass  # verify_checksums names the missing file
    verify_checksums(folder, recorded)
    return True


def finished_tasks(output_dir: str) -> list[str]:
    """Names of the finished task folders (those holding a state file) in `output_dir`, in task order."""
    if not os.path.isdir(output_dir):
        return []
    names = [name for name in os.listdir(output_dir)
             if name.startswith("task-") and name[5:].isdigit() and os.path.isfile(os.path.join(output_dir, name, STATE_NAME))]
    return sorted(names, key=lambda name: int(name[5:]))


def latest_task_checkpoint(output_dir: str) -> str | None:
    """The folder of the last finished task under `output_dir` (None if there is none)."""
    done = finished_tasks(output_dir)
    return os.path.join(output_dir, done[-1]) if done else None
