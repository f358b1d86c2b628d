"""Deterministic fault injection for crash tests: ``HF_PMI_KILL_AT=<point>:<n>`` SIGKILLs the process.

Points, each counted from 1 within the process: ``train_step`` (the n-th training step),
``save`` (the n-th task checkpoint, after its weights were written and before it is complete) and
``inversion`` (the n-th module call during replay synthesis). Without the variable nothing happens.

Example:
    $ HF_PMI_KILL_AT=inversion:200 python recipes/clip_digits.py --method pmi ...  # dies mid-inversion
"""

from __future__ import annotations

import contextlib
import os
import signal

ENV = "HF_PMI_KILL_AT"
_counts: dict[str, int] = {}


def _target(point: str) -> int | None:
    spec = os.environ.get(ENV, "")
    name, _, n = spec.partition(":")
    return int(n or 1) if name == point else None


def hit(point: str) -> None:
    """Count one passage through `point`; SIGKILL this process at the configured count."""
    target = _target(point)
    if target is None:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == target:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def counting_module_calls(point: str):
    """While active, every module call counts as one passage through `point` (only when armed)."""
    if _target(point) is None:
        yield
        return
    import torch

    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: hit(point))
    try:
        yield
    finally:
        handle.remove()
