"""Run any recipe over several seeds (or gather finished runs) and report mean ± std, with a plot of
accuracy against the number of seen classes.

    # run: recipe flags after `--`; each seed writes <output_dir>/seed-<s>/ (finished seeds are skipped)
    python benchmarks/multi_seed.py --recipe recipes/clip_cifar100.py --seeds 0 1 2 --output_dir runs/cifar-seeds \\
        -- --method pmi
    # gather runs that already exist
    python benchmarks/multi_seed.py --results runs/a/results.json runs/b/results.json --output_dir runs/summary

Each seed is passed as ``--seed`` and, when the recipe has the flag, as ``--class_order_seed``
too (results vary over seeds *and* class orders; method.md). Writes ``<output_dir>/summary.json``
(per metric: values, mean, std; the all-seen accuracy curve against the number of seen classes)
and ``<output_dir>/summary.png``, and prints one line per metric. The std is the sample standard
deviation (ddof 1; 0 for a single run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np

METRICS = ("a_last", "a_avg", "forgetting", "bwt")


def seen_classes(results_path: str, results: dict) -> list[int]:
    """Number of classes seen after each task: from the run's last task checkpoint, else equal tasks."""
    folder = os.path.dirname(os.path.abspath(results_path))
    num_tasks = len(results["accuracy_matrix"])
    states = sorted(glob.glob(os.path.join(folder, "task-*", "continual_state.json")),
                    key=lambda p: int(os.path.basename(os.path.dirname(p)).split("-")[1]))
    if states:
        with open(states[-1]) as f:
            task_classes = json.load(f)["task_classes"]
        if len(task_classes) == num_tasks:
            return [int(n) for n in np.cumsum([len(ids) for ids in task_classes])]
    total = len(results["class_names"])
    sizes = [total // num_tasks + (1 if t < total % num_tasks else 0) for t in range(num_tasks)]
    return [int(n) for n in np.cumsum(sizes)]


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"values": [float(v) for v in arr], "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def aggregate(paths: list[str]) -> dict:
    """Mean ± std of every metric and of the accuracy curve over the runs' ``results.json`` files."""
    if not paths:
        raise ValueError("No results.json to aggregate.")
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append((path, json.load(f)))
    classes = [seen_classes(p, r) for p, r in runs]
    if any(c != classes[0] for c in classes):
        raise ValueError(f"The runs cut their classes differently ({classes}): aggregate runs of one split only.")
    summary = {
        "runs": [p for p, _ in runs],
        "methods": sorted({r["method"] for _, r in runs}),
        "seeds": [r.get("seed") for _, r in runs],
        **{m: _stats([r[m] for _, r in runs]) for m in METRICS},
    }
    curves = np.asarray([r["all_seen_accuracy"] for _, r in runs], dtype=float)
    summary["curve"] = {
        "seen_classes": classes[0],
        "mean": [float(v) for v in curves.mean(0)],
        "std": [float(v) for v in (curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1]))],
        "runs": curves.tolist(),
    }
    return summary


def plot(summary: dict, path: str) -> str:
    """Accuracy over all seen classes (%) against the number of seen classes: mean ± std and every run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curve = summary["curve"]
    x = np.asarray(curve["seen_classes"])
    mean, std = 100 * np.asarray(curve["mean"]), 100 * np.asarray(curve["std"])
    fig = Figure(figsize=(5.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for run in curve["runs"]:
        ax.plot(x, 100 * np.asarray(run), color="0.7", linewidth=0.8)
    label = f"{'/'.join(summary['methods'])} (n={len(curve['runs'])})"
    ax.plot(x, mean, marker="o", color="C0", label=label)
    ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.2)
    ax.set_xlabel("number of seen classes")
    ax.set_ylabel("accuracy over seen classes (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"A_last {100 * summary['a_last']['mean']:.2f} ± {100 * summary['a_last']['std']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_seeds(recipe: str, seeds: list[int], output_dir: str, extra: list[str]) -> list[str]:
    """Run `recipe` once per seed (skipping seeds whose results.json exists); returns the results paths."""
    help_text = subprocess.run([sys.executable, recipe, "--help"], capture_output=True, text=True).stdout
    paths = []
    for seed in seeds:
        out = os.path.join(output_dir, f"seed-{seed}")
        results = os.path.join(out, "results.json")
        if not os.path.isfile(results):
            cmd = [sys.executable, recipe, "--output_dir", out, "--seed", str(seed)]
            if "--class_order_seed" in help_text:
                cmd += ["--class_order_seed", str(seed)]
            print("running:", " ".join(cmd + extra), flush=True)
            subprocess.run(cmd + extra, check=True)
        paths.append(results)
    return paths


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--recipe", help="recipe script to run per seed (flags for it after `--`)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default 0 1 2)")
    parser.add_argument("--results", nargs="+", help="results.json files (or globs) of finished runs to gather")
    parser.add_argument("--output_dir", required=True, help="where seed-<s>/ runs, summary.json and summary.png go")
    opts = parser.parse_args(argv)
    if bool(opts.recipe) == bool(opts.results):
        parser.error("give either --recipe (run seeds) or --results (gather finished runs)")
    os.makedirs(opts.output_dir, exist_ok=True)
    if opts.recipe:
        paths = run_seeds(opts.recipe, opts.seeds, opts.output_dir, extra)
    else:
        paths = sorted({p for pattern in opts.results for p in (glob.glob(pattern) or [pattern])})
    summary = aggregate(paths)
    with open(os.path.join(opts.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot(summary, os.path.join(opts.output_dir, "summary.png"))
    for m in METRICS:
        print(f"{m:<11} {100 * summary[m]['mean']:6.2f} ± {100 * summary[m]['std']:.2f}  (n={len(paths)})")
    return summary


if __name__ == "__main__":
    main()
