"""Integrity of saved files: checksums recorded when something is saved and verified when it is loaded,
and errors that name the file and the fix when a file cannot be read.

Every saver of hf_pmi records the sha256 of what it wrote: `ContinualCLIP.save_pretrained` in
``continual_clip.json`` (its weights, configs and prompts), `FeatureBank.save_pretrained` in
``feature_bank.json``, and a finished task in ``continual_state.json`` (every safetensors and JSON
file of the task folder). Every loader verifies them before reading a tensor, so a flipped bit, a
truncated or half-copied file fails at once, naming the file, instead of loading different weights.

The JSON files that list the others (``continual_clip.json``, ``feature_bank.json``,
``continual_state.json``) are sealed: `write_json` with ``seal=True`` records the sha256 of their own
content (`SEAL_KEY`), and `read_json` verifies any sealed file it reads, so a changed class name, task
list or recorded checksum is refused like a changed weight. `verify_task_folder` is the one call that
checks a whole task folder (for loaders hf_pmi does not own, e.g. transformers' ``AutoModel`` classes).

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
import json
import os

WEIGHT_SUFFIXES = (".safetensors",)
#: Files whose checksums a checkpoint records: weights and every JSON file (configs, tokenizer, state).
CHECKED_SUFFIXES = (".safetensors", ".json")
#: The key under which a sealed JSON file records the sha256 of the rest of its content.
SEAL_KEY = "json_sha256"
_CHUNK = 1 << 20  # read 1 MiB at a time: constant memory for multi-GB weight files


class CheckpointFileError(ValueError):
    """A file of a saved model, feature bank or task checkpoint is missing, corrupt or unreadable."""


class ChecksumError(CheckpointFileError):
    """A file differs from the one written with the checkpoint (or is missing)."""


def fix_for(path: str) -> str:
    """How to get an intact copy of `path` (a file in the Hugging Face cache is downloaded again)."""
    if f"{os.sep}snapshots{os.sep}" in os.path.abspath(path):
        return ("It is a download in the Hugging Face cache: delete that snapshot (`hf cache delete`, or remove the "
                "folder) and load again to download it afresh.")
    return "Copy or download the checkpoint again, or resume from an earlier task folder."


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(folder: str, suffixes: tuple[str, ...] = CHECKED_SUFFIXES, exclude: tuple[str, ...] = ()
                   ) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under `folder` ending with one of `suffixes` (POSIX
    separators, sorted), except the relative paths in `exclude`."""
    sums = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(suffixes):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, folder).replace(os.sep, "/")
                if rel not in exclude:
                    sums[rel] = sha256_file(path)
    return dict(sorted(sums.items()))


def weight_checksums(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every weight (safetensors) file under `folder`."""
    return file_checksums(folder, WEIGHT_SUFFIXES)


def verify_checksums(folder: str, recorded: dict[str, str] | None) -> None:
    """Raise `ChecksumError` unless every recorded file exists under `folder` with its checksum."""
    for rel, expected in (recorded or {}).items():
        path = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(path):
            raise ChecksumError(f"{path} is missing: the checkpoint {folder} is incomplete. {fix_for(path)}")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"{path} is corrupt: its sha256 is {actual}, the checkpoint recorded {expected}. The file changed "
                f"after it was written (disk error, partial copy, manual edit). {fix_for(path)}"
            )


def json_seal(obj: dict) -> str:
    """The sha256 of `obj` without its `SEAL_KEY`, as JSON with sorted keys (independent of indentation and of
    the order keys were written in; values JSON cannot hold are taken as their ``str``, as `write_json` writes them)."""
    body = json.loads(json.dumps({k: v for k, v in obj.items() if k != SEAL_KEY}, default=str))
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_json(path: str, obj, *, seal: bool = False) -> None:
    """Write `obj` as JSON to `path` atomically (a temporary file renamed into place); with `seal` (a dict) the
    file also records its own sha256 under `SEAL_KEY`, which `read_json` verifies."""
    if seal:
        obj = {**{k: v for k, v in obj.items() if k != SEAL_KEY}, SEAL_KEY: json_seal(obj)}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    """The JSON object in `path`; a missing, truncated or malformed file raises `CheckpointFileError` naming it,
    and a sealed file (`write_json` with ``seal=True``) whose content changed raises `ChecksumError`. The seal
    itself is not part of the returned object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointFileError(f"{path} is missing. {fix_for(path)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFileError(
            f"{path} cannot be read ({type(e).__name__}: {e}): it is truncated or not the file hf_pmi wrote. "
            f"{fix_for(path)}"
        ) from None
    if isinstance(obj, dict) and SEAL_KEY in obj:
        recorded = obj.pop(SEAL_KEY)
        if recorded != json_seal(obj):
            raise ChecksumError(
                f"{path} is corrupt: its content no longer matches the sha256 recorded in it ({SEAL_KEY}). It changed "
                f"after it was written (disk error, partial copy, manual edit), so the classes, tasks or checksums it "
                f"lists cannot be trusted. {fix_for(path)}"
            )
    return obj


def save_safetensors(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, but byte-for-byte reproducible: safetensors writes the metadata in the order
    of a hash map, which differs from process to process when there are several keys, so equal tensors gave files
    with different checksums. The header is rewritten with sorted keys (same length, same offsets).

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> save_safetensors({"x": torch.zeros(2)}, path, {"format": "pt", "block": "3"})
        >>> open(path, "rb").read()[8:52]
        b'{"__metadata__":{"block":"3","format":"pt"},'
    """
    import struct

    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    ordered = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    ordered += b" " * (size - len(ordered))  # safetensors pads the header with spaces: keep its length
    with open(path, "wb") as f:
        f.write(data[:8] + ordered + data[8 + size :])


def load_safetensors(path: str) -> dict:
    """The tensors of the safetensors file `path`; an unreadable file raises `CheckpointFileError` naming it."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointFileError(f"{path} is missing. {fix_for(path)}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (header, truncation) or OSError
        raise CheckpointFileError(
            f"{path} cannot be read ({type(e).__name__}: {e}): it is truncated or not a safetensors file. "
            f"{fix_for(path)}"
        ) from None


def unreadable(what: str, error: Exception, path: str) -> CheckpointFileError:
    """The error for a saved component (e.g. "the CLIP model in clip/") that a library failed to load."""
    return CheckpointFileError(
        f"{what} at {path} cannot be loaded ({type(error).__name__}: {error}). A file there is truncated or not the "
        f"one hf_pmi wrote. {fix_for(path)}"
    )
