"""Checksums of a checkpoint's weight files: recorded when a task is saved, verified when it is loaded.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, "model.safetensors"), "wb").write(b"weights")
    7
    >>> sums = weight_checksums(d)
    >>> verify_checksums(d, sums)
    >>> open(os.path.join(d, "model.safetensors"), "wb").write(b"changed")
    7
    >>> verify_checksums(d, sums)
    Traceback (most recent call last):
    ...
    hf_pmi.integrity.ChecksumError: ...model.safetensors is corrupt: ...
"""

from __future__ import annotations

import hashlib
import os

WEIGHT_SUFFIXES = (".safetensors",)
_CHUNK = 1 << 20  # read 1 MiB at a time: constant memory for multi-GB weight files


class ChecksumError(ValueError):
    """A weight file is missing or differs from the one written with the checkpoint."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_checksums(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every weight file under `folder` (POSIX separators, sorted)."""
    sums = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(WEIGHT_SUFFIXES):
                path = os.path.join(root, name)
                sums[os.path.relpath(path, folder).replace(os.sep, "/")] = sha256_file(path)
    return dict(sorted(sums.items()))


def verify_checksums(folder: str, recorded: dict[str, str] | None) -> None:
    """Raise `ChecksumError` unless every recorded weight file exists under `folder` with its checksum."""
    for rel, expected in (recorded or {}).items():
        path = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(path):
            raise ChecksumError(
                f"{path} is missing: the checkpoint {folder} is incomplete. Copy or download it again, or resume "
                f"from an earlier task folder."
            )
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"{path} is corrupt: its sha256 is {actual}, the checkpoint recorded {expected}. The file changed "
                f"after it was written (disk error, partial copy, manual edit). Copy or download the checkpoint "
                f"again, or resume from an earlier task folder."
            )
