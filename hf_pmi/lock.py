"""One writer per output folder: a run holds ``output_dir/.hf_pmi_run.lock`` while it writes there.

The lock is an operating-system lock (``flock``) on that file, held by the run's main process, and the
file names the run (process id, host, command line, start time). A second run on the same folder is
refused before any work, with an error that names the first (`RunLockError`). Other processes of the
same launch (``accelerate launch``, ``torchrun``) do not take the lock: only the main process writes.

The operating system releases the lock when its process ends, however it ends, so a crash or a
``kill -9`` never leaves the folder locked. It does leave the file behind: a lock file that no process
holds is a stale one, and the next run says which run ended without finishing (and when it started),
then takes the folder over (``--resume_from_checkpoint true`` continues after its last finished task).

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

from .checkpoint import STATE_NAME
from .log import get_logger

LOCK_NAME = ".hf_pmi_run.lock"
logger = get_logger()

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the holder's process id stands in for the OS lock
    fcntl = None


class RunLockError(RuntimeError):
    """Another run holds the output folder; the message names it and what to do."""


def _describe(holder: dict) -> str:
    return (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()  # 64 KiB: a record is a few hundred bytes
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": "?", "command": raw[:200]}


def _alive(holder: dict) -> bool:
    """Without an OS lock: whether the holder's process still runs (only knowable on its own host)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, ValueError, TypeError, KeyError):
        return False
    except PermissionError:
        return True
    return True


def _held(lock_file: str) -> tuple[bool, dict]:
    """Whether a live process holds `lock_file`, and its record."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return False, {}
    try:
        holder = _read(fd) or {}
        if fcntl is None:
            return _alive(holder), holder
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, holder
        return False, holder
    finally:
        os.close(fd)  # closing releases the probe's lock


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
        lock_file = os.path.join(parent, LOCK_NAME)
        if os.path.isfile(lock_file):
            live, holder = _held(lock_file)
            state = (f"is running there ({_describe(holder)}) and replaces its task-N folders as it saves them"
                     if live else f"ended there without finishing ({_describe(holder)}) and writes its task-N "
                     f"folders there when it is resumed")
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
        self._fd: int | None = None

    def _open_locked(self) -> tuple[int, dict | None]:
        """Open the lock file and lock it; raises `RunLockError` naming the holder when a live run has it."""
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = _read(fd) or {}
                    os.close(fd)
                    raise self._busy(holder) from None
                try:  # the holder may have removed the file after we opened it: lock the file that is there
                    if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                        os.close(fd)
                        continue
                except FileNotFoundError:
                    os.close(fd)
                    continue
            previous = _read(fd)
            if fcntl is None and previous and previous.get("pid") != os.getpid() and _alive(previous):
                os.close(fd)
                raise self._busy(previous)
            return fd, previous

    def _busy(self, holder: dict) -> RunLockError:
        return RunLockError(
            f"Another run is writing to {self.output_dir}: {_describe(holder)}. Two runs in one output_dir would "
            f"mix their checkpoints. Wait for it to finish, stop it (kill {holder.get('pid')}), or choose another "
            f"--output_dir."
        )

    def check(self) -> None:
        """Raise `RunLockError` if a live run holds the folder or it is nested in another's; changes nothing (a stale lock stays for `acquire`)."""
        if self._fd is not None:
            return
        check_not_nested(self.output_dir)
        if not os.path.exists(self.path):
            return
        fd, _ = self._open_locked()
        os.close(fd)  # closing releases the probe's lock

    def acquire(self) -> "RunLock":
        """Take the folder for this process (see the module docstring); idempotent."""
        if self._fd is not None:
            return self
        check_not_nested(self.output_dir)
        fd, previous = self._open_locked()
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
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the folder back (the lock file is removed)."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing releases the OS lock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
