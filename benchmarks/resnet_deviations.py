"""The measured effect of each remaining deviation from the reference's ResNet path (issue 30; docs/resnet.md,
"Remaining deviations"): `pmi` on the fonts world of `continual_resnet.py`, once per variant, paired by seed
with hf_pmi's default run of that benchmark.

    OMP_NUM_THREADS=1 python benchmarks/resnet_deviations.py --seeds 0 1 2 --workdir runs/deviations
        # -> benchmarks/results/resnet_deviations.json

Variants (each one flag of `ResNetContinualConfig` / `continual_resnet.py` against hf_pmi's default):

- ``product``: the reference's loss, ``ce + hkd + rkd x ft`` (``ce + hkd x ft`` in the new-rows stage), for the sum;
- ``random_classes``: each inversion target's class drawn uniformly (the reference) for equal shares;
- ``black_padding``: crops pad black (the reference's torchvision order) for the channel mean (task 0 retrained);
- ``no_crop``: no augmentation at all (``--shift 0``; the reference's own augmentation is not readable);
- ``last_stage``: the second stage trains the whole last stage for its last residual block;
- ``running_counts``: the head fine-tuning keeps counting classes (weights renewed per batch) for fixed counts;
- ``reference``: the four readings the ResNet recipes default to together (product, random classes, black padding,
  running counts);
- hf_pmi's settings kept as flags against the reference's choices: ``regenerate_once`` (each class inverted once,
  after its task, for the re-fitted pool inverted anew), ``gaussian_targets`` (plain draws for CFS) and
  ``one_cycle`` (hf_pmi's loop before issue 30 for the staged schedule; task 0 retrained).

The default is run here too (or taken from ``--default_runs``, whose settings must match). Every other
setting is the benchmark command of docs/resnet.md (ResNet-20, 10 later epochs). Runs go by seed, ``--jobs`` at a
time, each a process of `continual_resnet.py` with one torch thread; finished runs in ``--workdir`` are reused.
Writes ``{"variants": {name: {"flags", "a_last": {mean, std}, "delta": {mean, std}, "per_seed"}}, "runs"}``:
``delta`` is the variant minus the default on the same seed (sample standard deviation over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from continual_resnet import VARIANTS, row_settings  # noqa: E402

BENCHMARK = Path(__file__).with_name("continual_resnet.py")
# The benchmark command of docs/resnet.md ("After issue 30") and continual_resnet.py's other defaults.
BASE = {"train_per_class": 300, "first_epochs": 60, "later_epochs": 10, "replay_per_class": 20, "blocks_per_stage": 3,
        "schedule": "staged", "regenerate": 1, "selection": "cfs", "head_epochs": 5, "head_lr": 0.005, "shift": 2,
        **VARIANTS}
RUNS = {
    "default": {},
    "product": {"loss_form": "product"},
    "random_classes": {"target_classes": "random"},
    "black_padding": {"crop_fill": "black"},
    "no_crop": {"shift": 0},
    "last_stage": {"last_stage": "stage"},
    "running_counts": {"head_counts": "running"},
    "reference": {"loss_form": "product", "target_classes": "random", "crop_fill": "black", "head_counts": "running"},
    # hf_pmi's own settings kept as flags, each against the reference's choice (the default)
    "regenerate_once": {"regenerate": 0},
    "gaussian_targets": {"selection": "gaussian"},
    "one_cycle": {"schedule": "one_cycle"},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="*", default=[k for k in RUNS if k != "default"], choices=list(RUNS)[1:])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", default="runs/deviations")
    parser.add_argument("--default_runs", default="",
                        help="continual_resnet.py results whose pmi rows with these settings serve as the default "
                             "(empty: run the default here too, on the same host as the variants: a run is chaotic, "
                             "so another host's float rounding can move it as much as a flag)")
    parser.add_argument("--output", default="benchmarks/results/resnet_deviations.json")
    parser.add_argument("--no_run", action="store_true", help="summarise the finished runs in --workdir, start none")
    args = parser.parse_args(argv)

    rows, todo = {}, []
    if args.default_runs:
        for r in json.loads(Path(args.default_runs).read_text())["runs"]:
            if r["method"] == "pmi" and row_settings(r) == BASE and r["seed"] in args.seeds:
                rows[("default", r["seed"])] = r
    for seed in args.seeds:
        for name in ["default", *args.variants]:
            settings = {**BASE, **RUNS[name]}
            path = Path(args.workdir) / name / f"pmi-{seed}.json"
            if ("default", seed) in rows and name == "default":
                continue
            if path.exists() and row_settings(json.loads(path.read_text())) == settings:
                rows[(name, seed)] = json.loads(path.read_text())
            elif not args.no_run:
                todo.append((name, seed, settings, path))
    env, running, t0 = {**os.environ, "OMP_NUM_THREADS": "1"}, [], time.perf_counter()
    while todo or running:
        while todo and len(running) < args.jobs:
            name, seed, settings, path = todo.pop(0)
            path.parent.mkdir(parents=True, exist_ok=True)
            for cache in Path(args.workdir).glob(f"*/task0-seed{seed}-*.pt"):  # a shared first task when the tag fits
                if not (path.parent / cache.name).exists():
                    os.link(cache, path.parent / cache.name)
            cmd = [sys.executable, str(BENCHMARK), "--_run", "pmi", str(seed), "--workdir", str(path.parent),
                   *[f"--{k}={v}" for k, v in settings.items()]]
            with open(path.with_suffix(".log"), "w") as log:
                running.append((name, seed, path, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(2)
        for item in list(running):
            name, seed, path, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"{name} seed {seed} failed (exit {proc.returncode}): see {path.with_suffix('.log')}")
            rows[(name, seed)] = row = json.loads(path.read_text())
            print(f"{name:>15} seed {seed}: A_last {row['a_last']:.3f} ({row['wall_seconds']:.0f} s; "
                  f"{time.perf_counter() - t0:.0f} s in all)", flush=True)

    variants = {}
    for name in ["default", *args.variants]:
        seeds = [s for s in args.seeds if (name, s) in rows and ("default", s) in rows]
        if not seeds:
            continue
        vals = [rows[(name, s)]["a_last"] for s in seeds]
        deltas = [rows[(name, s)]["a_last"] - rows[("default", s)]["a_last"] for s in seeds]

        def spread(v):  # sample standard deviation (n - 1) over seeds
            return {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}

        variants[name] = {"flags": RUNS[name], "seeds": seeds, "a_last": spread(vals), "delta": spread(deltas),
                          "per_seed": vals, "inversion_seconds": spread([rows[(name, s)]["inversion_seconds"] for s in seeds])}
        print(f"{name:>15}: A_last {variants[name]['a_last']['mean']:.3f} ± {variants[name]['a_last']['std']:.3f}, "
              f"minus the default per seed {variants[name]['delta']['mean']:+.3f} ± {variants[name]['delta']['std']:.3f}")
    command = " ".join(["OMP_NUM_THREADS=1 python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]])
    out = {"variants": variants, "settings": BASE, "command": command,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, one torch thread per run, {args.jobs} at a time",
           "runs": [{"variant": k[0], **v} for k, v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0]))]}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
