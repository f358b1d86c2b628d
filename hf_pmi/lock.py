"""One writer per output folder: a run holds ``output_dir/.hf_pmi_run.lock`` while it writes there.

The lock is `filelock.FileLock` (an operating-system lock on that file), held by the run's main process,
and the file names the run holding it (process id, host, command line, start time; written in place once
the lock is held, which filelock >= 4.3 never truncates). A second run on the same folder is refused before
any work, with an error that names the first (`RunLockError`). Other processes of the same launch (``accelerate launch``, ``torchrun``) do not take the
lock: only the main process writes.

The operating system releases the lock when its process ends, however it ends, so a crash or a ``kill -9``
never leaves the folder locked. It does leave the file behind: a lock file that no process holds is a
stale one, and the next run says which run ended without finishing (and when it started), then takes the
folder over (``--resume_from_checkpoint true`` continues after its last finished task).

An output folder inside another run's output folder (e.g. its future ``task-N``, which that run would replace
with the task it saves) or inside a finished task folder (the run would be saved and pushed with that
checkpoint) is refused too, by `check` and `acquire` alike (`check_not_nested`).

Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> with RunLock(out):
    ...     RunLock(out).acquire()
    Traceback (most recent call last):
    ...
    hf_pmi.lock.RunLockError: Another run is writing to ...
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import sys

from filelock import FileLock, Timeout

from .checkpoint import STATE_NAME
from .log import get_logger

LOCK_NAME = ".hf_pmi_run.lock"
logger = get_logger()
#: The locks this process holds, by path: a lock lives until `RunLock.release` or the end of the process, even
#: when its `RunLock` is dropped (filelock gives a lock back when its object is garbage-collected).
_HELD: dict[str, FileLock] = {}


class RunLockError(RuntimeError):
    """Another run holds the output folder; the message names it and what to do."""


def _describe(holder: dict) -> str:
    return (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


def _record(folder: str) -> dict | None:
    """The record of the run that holds (or held) `folder`'s lock; None without one."""
    try:
        with open(os.path.join(folder, LOCK_NAME), encoding="utf-8") as f:
            raw = f.read(1 << 16).strip()  # 64 KiB: a record is a few hundred bytes
    except OSError:
        return None
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": "?", "command": raw[:200]}


def _held(folder: str) -> bool:
    """Whether a live process holds the lock of `folder` (probed: taken and given back at once)."""
    if not os.path.exists(os.path.join(folder, LOCK_NAME)):
        return False
    probe = FileLock(os.path.join(folder, LOCK_NAME), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def check_not_nested(output_dir: str | os.PathLike) -> None:
    """Raise `RunLockError` when `output_dir` lies inside another run's output folder (one holding a lock file:
    a running run, or one that ended without finishing and may be resumed) or inside a finished task folder."""
    path = os.path.abspath(os.fspath(output_dir))
    parent = os.path.dirname(path)
    while parent != os.path.dirname(parent):
        outside = os.path.join(os.path.dirname(parent), os.path.basename(path) + "-run")
        if os.path.isfile(os.path.join(parent, STATE_NAME)):
            raise RunLockError(
                f"output_dir {path} is inside {parent}, a finished task folder (it holds {STATE_NAME}): this run "
                f"would be written into that checkpoint and uploaded with it. Choose an output_dir outside it, "
                f"e.g. {outside}."
            )
        if os.path.isfile(os.path.join(parent, LOCK_NAME)):
            holder = _record(parent) or {}
            state = (f"is running there ({_describe(holder)}) and replaces its task-N folders as it saves them"
                     if _held(parent) else f"ended there without finishing ({_describe(holder)}) and writes its "
                     f"task-N folders there when it is resumed")
            raise RunLockError(
                f"output_dir {path} is inside {parent}, the output folder of another run, which {state}: the two runs "
                f"would destroy each other's checkpoints. Choose an output_dir outside it, e.g. {outside}."
            )
        parent = os.path.dirname(parent)


class RunLock:
    """The lock of `output_dir` (module docstring). Use as a context manager, or `acquire` / `release`."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = os.fspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_NAME)
        self._lock: FileLock | None = None

    def _busy(self) -> RunLockError:
        holder = _record(self.output_dir) or {}
        return RunLockError(
            f"Another run is writing to {self.output_dir}: {_describe(holder)}. Two runs in one output_dir would "
            f"mix their checkpoints. Wait for it to finish, stop it (kill {holder.get('pid')}), or choose another "
            f"--output_dir."
        )

    def check(self) -> None:
        """Raise `RunLockError` if a live run holds the folder or it is nested in another's; changes nothing (a
        stale lock file stays for `acquire`)."""
        if self._lock is not None:
            return
        check_not_nested(self.output_dir)
        if _held(self.output_dir):
            raise self._busy()

    def acquire(self) -> "RunLock":
        """Take the folder for this process (see the module docstring); idempotent."""
        if self._lock is not None:
            return self
        check_not_nested(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        lock = FileLock(self.path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise self._busy() from None
        previous = _record(self.output_dir)
        if previous:
            logger.warning(
                "%s holds the lock file of a run that ended without finishing: %s. That run crashed or was killed "
                "(e.g. kill -9, out of memory, a lost machine); its finished task folders are intact, a "
                "half-written task-N.tmp is discarded. This run takes %s over.",
                self.path, _describe(previous), self.output_dir,
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": shlex.join([sys.executable, *sys.argv])}
        with open(self.path, "w", encoding="utf-8") as f:  # in place: the locked file must stay the same file
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._lock = _HELD[os.path.abspath(self.path)] = lock
        return self

    def release(self) -> None:
        """Give the folder back (the lock file is removed)."""
        if self._lock is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self._lock.release()
        _HELD.pop(os.path.abspath(self.path), None)
        self._lock = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
