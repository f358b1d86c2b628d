"""Pre-trained offline backbones: shipped with hf_pmi, or trained once and cached.

`cached_pretrained(name, train, **kwargs)` returns a `CLIPModel`:

1. **shipped**: when ``name`` and ``kwargs`` are those of a backbone shipped in the package
   (``hf_pmi/testing/pretrained/``, listed in `SHIPPED_MANIFEST` with the command that made each file
   and its sha256), that file is loaded, after its sha256 is verified. Nothing is trained, so a demo
   starts from the same weights on every machine (its numbers are bit-identical for a seed on one machine;
   another CPU's floating-point kernels can round differently and move them a little). A file that does not match its checksum is an error
   naming the fix.
2. **cached**: otherwise from the cache folder ``<cache_dir>/<name>-<kwargs>`` (``$HF_PMI_CACHE``, else
   ``~/.cache/hf_pmi``), trained first when that folder holds none. ``train`` is a function
   ``train(folder, **kwargs)`` given by its import path (so that it can also run in a subprocess) that
   writes a `CLIPModel` to ``folder``. A file lock makes concurrent callers (processes of one launch,
   parallel benchmark runs) train it once; under a distributed launch the training runs in a separate
   single process, since the launch's own processes would wait for each other. The model is written to
   a temporary folder and renamed into place, so a crash leaves no half-written cache.

`export_pretrained` trains a backbone afresh and ships it (``python -m hf_pmi.testing.backbones
--export letters``). The returned model has an empty ``name_or_path``: a cache or package folder is no
home a checkpoint or a Hub repo could point to, so checkpoints built on it keep its weights.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

from ..integrity import sha256_file
from ..log import get_logger

# What torchrun / accelerate launch set to make a process one rank of a group.
_LAUNCH_VARIABLES = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
#: The backbones shipped in the package: one folder each (config.json, model.safetensors) and a manifest.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
SHIPPED_MANIFEST = "SHIPPED.json"
WEIGHTS = "model.safetensors"
logger = get_logger()


class ShippedBackboneError(RuntimeError):
    """A shipped backbone's file is not the one its manifest records."""


def default_cache_dir() -> str:
    """``$HF_PMI_CACHE``, else ``~/.cache/hf_pmi``."""
    return os.environ.get("HF_PMI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_pmi")


def cache_folder(name: str, cache_dir: str | None = None, **kwargs) -> str:
    """The folder a backbone with these arguments is cached in (every argument is in its name)."""
    parts = [name] + [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(kwargs.items())]
    return os.path.join(cache_dir or default_cache_dir(), "-".join(parts))


def shipped_manifest(shipped_dir: str | None = None) -> dict:
    """``{folder name: {"name", "arguments", "sha256", "bytes", "command", "made"}}`` of the shipped backbones."""
    path = os.path.join(shipped_dir or SHIPPED_DIR, SHIPPED_MANIFEST)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def shipped_folder(name: str, shipped_dir: str | None = None, **kwargs) -> str | None:
    """The verified folder of the shipped backbone ``name`` with exactly these arguments, or None if none is
    shipped (then it is pre-trained). Raises `ShippedBackboneError` when its weights do not match the manifest."""
    shipped_dir = shipped_dir or SHIPPED_DIR
    key = os.path.basename(cache_folder(name, **kwargs))
    entry = shipped_manifest(shipped_dir).get(key)
    if entry is None:
        return None
    folder = os.path.join(shipped_dir, key)
    weights = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(weights):
        logger.warning("The shipped backbone %s is missing from this installation: it is pre-trained instead.", key)
        return None
    actual = sha256_file(weights)
    if actual != entry["sha256"]:
        raise ShippedBackboneError(
            f"{weights} is not the shipped backbone: its sha256 is {actual}, {SHIPPED_MANIFEST} records "
            f"{entry['sha256']} ({entry['bytes']} bytes; this file has {os.path.getsize(weights)}). It was changed, "
            f"truncated, or is a Git LFS pointer. Restore it (`git checkout -- {os.path.relpath(folder)}`, or "
            f"reinstall hf_pmi), or make it again with `{entry['command']}`."
        )
    return folder


def _load(folder: str):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(folder)
    clip.config._name_or_path = ""
    clip.name_or_path = ""
    return clip.eval()


def _train(train: str, staging: str, kwargs: dict) -> None:
    """Run ``train(staging, **kwargs)``, in a process of its own under a distributed launch."""
    module, function = train.split(":")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("TORCHELASTIC_")}
        code = f"from {module} import {function} as f; f({staging!r}, **{kwargs!r})"
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
    else:
        getattr(importlib.import_module(module), function)(staging, **kwargs)


def cached_pretrained(name: str, train: str, cache_dir: str | None = None, **kwargs):
    """Load the backbone ``name`` trained by ``train(folder, **kwargs)`` (``"module:function"``): the shipped
    one for these arguments if there is one, else the cached one, training it first if it is not cached."""
    from filelock import FileLock

    shipped = shipped_folder(name, **kwargs)
    if shipped is not None:
        entry = shipped_manifest()[os.path.basename(shipped)]
        logger.warning("Using the %s shipped with hf_pmi (%s, %.1f MB, sha256 verified): no pre-training.",
                       entry["name"], os.path.relpath(shipped), entry["bytes"] / 1e6)
        return _load(shipped)
    folder = cache_folder(name, cache_dir, **kwargs)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with FileLock(folder + ".lock"):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            logger.warning("Pre-training the backbone %s once (not your run; its progress bar follows); it will be "
                           "cached in %s.", os.path.basename(folder), folder)
            with tempfile.TemporaryDirectory(dir=os.path.dirname(folder)) as work:
                staging = os.path.join(work, "clip")
                _train(train, staging, kwargs)
                os.replace(staging, folder)
        return _load(folder)


def export_pretrained(name: str, train: str, description: str, command: str, shipped_dir: str | None = None,
                      **kwargs) -> dict:
    """Train the backbone ``name`` afresh (never from the cache) and ship it: ``config.json`` and
    ``model.safetensors`` in ``<shipped_dir>/<name>-<kwargs>/`` and its manifest entry (the arguments, the
    sha256, the size and `command`, the command line that made it). Returns the entry."""
    shipped_dir = shipped_dir or SHIPPED_DIR
    key = os.path.basename(cache_folder(name, **kwargs))
    target = os.path.join(shipped_dir, key)
    with tempfile.TemporaryDirectory() as work:
        staging = os.path.join(work, "clip")
        _train(train, staging, kwargs)
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        for file in ("config.json", WEIGHTS):
            shutil.copy(os.path.join(staging, file), target)
    entry = {
        "name": description,
        "arguments": kwargs,
        "sha256": sha256_file(os.path.join(target, WEIGHTS)),
        "bytes": os.path.getsize(os.path.join(target, WEIGHTS)),
        "command": command,
        "made": f"{datetime.date.today().isoformat()}, torch {_version('torch')}, transformers "
                f"{_version('transformers')}",
    }
    manifest = {**shipped_manifest(shipped_dir), key: entry}
    with open(os.path.join(shipped_dir, SHIPPED_MANIFEST), "w") as f:
        json.dump(dict(sorted(manifest.items())), f, indent=2)
        f.write("\n")
    return entry


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
