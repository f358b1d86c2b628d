"""One recipe run in a subprocess, as a user runs it, shared by the benchmark scripts.

A run whose ``<out>/results.json`` holds every task of the sequence is reused, not rerun (delete the
folder to redo it), so a long benchmark that stopped goes on where it was. The arguments of a run are
kept beside it (``<out>/benchmark_args.json``); a folder that holds a run of other arguments is an error.
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finished(out: str, num_tasks: int | None = None) -> dict | None:
    """The results of a finished run in `out` (every row of its accuracy matrix filled), else None."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    rows = len(result["accuracy_matrix"])
    return result if rows and rows == len(result["accuracy_matrix"][-1]) and rows == (num_tasks or rows) else None


def run_recipe(recipe: str, out: str, args: list[str], label: str = "", threads: int = 1) -> dict:
    """Run `recipe` with ``--output_dir out`` and `args` in its own process (offline, `threads` torch
    threads) unless `out` holds a finished run; returns its ``results.json`` plus ``seconds`` (the process's
    wall time, None when reused)."""
    done = finished(out)
    args_path = os.path.join(out, "benchmark_args.json")
    if done is not None:
        if os.path.isfile(args_path):
            with open(args_path) as f:
                before = json.load(f)
            if before != list(args):
                raise RuntimeError(f"{out} holds a run of other arguments ({' '.join(before)}), not {' '.join(args)}: "
                                   "delete the folder (or pass another --workdir) to run these.")
        return {**done, "seconds": None}
    cmd = [sys.executable, recipe, "--output_dir", out, "--disable_tqdm", "true", "--overwrite_output_dir", "true",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label or out} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    result = finished(out)
    with open(args_path, "w") as f:
        json.dump(list(args), f)
    print(f"{label or out}: A_last {result['a_last']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return {**result, "seconds": time.time() - t0}
