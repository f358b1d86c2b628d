"""Pre-trained offline backbones, trained once and cached: the shared mechanism of every offline world.

`cached_pretrained(name, train, **kwargs)` returns a `CLIPModel` from the cache folder
``<cache_dir>/<name>-<kwargs>`` and trains it first when that folder does not hold one. ``train``
is a function ``train(folder, **kwargs)`` given by its import path (so that it can also run in a
subprocess) that writes a `CLIPModel` to ``folder``. A file lock makes concurrent callers
(processes of one launch, parallel benchmark runs) train it once; under a distributed launch the
training runs in a separate single process, since the launch's own processes would wait for each
other. The model is written to a temporary folder and renamed into place, so a crash leaves no
half-written cache. The returned model has an empty ``name_or_path``: a cache folder is no home a
checkpoint or a Hub repo could point to, so checkpoints built on it keep its weights.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile

# What torchrun / accelerate launch set to make a process one rank of a group.
_LAUNCH_VARIABLES = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def default_cache_dir() -> str:
    """``$HF_PMI_CACHE``, else ``~/.cache/hf_pmi``."""
    return os.environ.get("HF_PMI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_pmi")


def cache_folder(name: str, cache_dir: str | None = None, **kwargs) -> str:
    """The folder a backbone with these arguments is cached in (every argument is in its name)."""
    parts = [name] + [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(kwargs.items())]
    return os.path.join(cache_dir or default_cache_dir(), "-".join(parts))


def cached_pretrained(name: str, train: str, cache_dir: str | None = None, **kwargs):
    """Load the backbone ``name`` trained by ``train(folder, **kwargs)`` (``"module:function"``),
    training it first if it is not cached."""
    from filelock import FileLock
    from transformers import CLIPModel

    folder = cache_folder(name, cache_dir, **kwargs)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with FileLock(folder + ".lock"):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            module, function = train.split(":")
            with tempfile.TemporaryDirectory(dir=os.path.dirname(folder)) as work:
                staging = os.path.join(work, "clip")
                if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                    env = {k: v for k, v in os.environ.items()
                           if k not in _LAUNCH_VARIABLES and not k.startswith("TORCHELASTIC_")}
                    code = f"from {module} import {function} as f; f({staging!r}, **{kwargs!r})"
                    subprocess.run([sys.executable, "-c", code], env=env, check=True)
                else:
                    getattr(importlib.import_module(module), function)(staging, **kwargs)
                os.replace(staging, folder)
        clip = CLIPModel.from_pretrained(folder)
    clip.config._name_or_path = ""
    clip.name_or_path = ""
    return clip.eval()
