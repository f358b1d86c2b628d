"""Deterministic SIGKILLs for crash tests, installed from outside the library (the shipped hf_pmi never kills itself).

``python -c "import kill_points; kill_points.main()" <point>:<n> <script> [args...]`` (with ``tests/`` on
``PYTHONPATH``) runs the recipe `script` as ``__main__`` after wrapping a few hf_pmi functions so that the
process SIGKILLs itself at the n-th passage (counted from 1) through `point`:

- ``train_step``: the n-th training step (`ContinualTrainer.compute_loss`);
- ``save``: the n-th task checkpoint, after its weights were written and before it is complete (the
  n-th write of a ``continual_state.json``);
- ``inversion``: the n-th module call inside a replay method's work between tasks (``after_task`` of
  `pmi` / `full_inversion`: statistics, feature bank and replay synthesis).

``pause:<file>`` does not kill: the run stops before writing its first task checkpoint, creates
``<file>.waiting`` and waits until ``<file>`` exists (a test then acts while the run holds its output folder).
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import sys

_counts: dict[str, int] = {}


def _hit(point: str, target: int) -> None:
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == target:
        os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    """Arm the kill point ``<point>:<n>``."""
    import torch

    import hf_pmi.trainer
    from hf_pmi.checkpoint import STATE_NAME
    from hf_pmi.methods import METHODS

    point, _, n = spec.partition(":")
    if point == "pause":
        _pause_before_first_save(n)
        return
    target = int(n or 1)
    if point == "train_step":
        compute_loss = hf_pmi.trainer.ContinualTrainer.compute_loss

        @functools.wraps(compute_loss)
        def counted_loss(self, *args, **kwargs):
            loss = compute_loss(self, *args, **kwargs)
            _hit(point, target)
            return loss

        hf_pmi.trainer.ContinualTrainer.compute_loss = counted_loss
    elif point == "save":
        write_json = hf_pmi.trainer.write_json

        def counted_write(path, obj):
            if os.path.basename(path) == STATE_NAME:
                _hit(point, target)
            return write_json(path, obj)

        hf_pmi.trainer.write_json = counted_write
    elif point == "inversion":
        for cls in {METHODS["pmi"], METHODS["full_inversion"]}:
            after_task = cls.__dict__.get("after_task") or cls.after_task

            def counted_after_task(self, task_id, _after_task=after_task):
                hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: _hit(point, target))
                try:
                    return _after_task(self, task_id)
                finally:
                    hook.remove()

            cls.after_task = counted_after_task
    else:
        raise ValueError(f"Unknown kill point {point!r}: train_step, save or inversion.")


def _pause_before_first_save(signal_file: str) -> None:
    import time

    import hf_pmi.trainer

    save_task = hf_pmi.trainer.ContinualTrainer._save_task

    def paused_save(self, *args, **kwargs):
        if not os.path.exists(signal_file + ".waiting"):
            open(signal_file + ".waiting", "w").close()
            while not os.path.exists(signal_file):
                time.sleep(0.1)
        return save_task(self, *args, **kwargs)

    hf_pmi.trainer.ContinualTrainer._save_task = paused_save


def main() -> None:
    spec, script, *argv = sys.argv[1:]
    install(spec)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
