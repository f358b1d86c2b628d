"""Every continual method on the digits protocol (recipes/clip_digits.py), or on another recipe's
(``--recipe``), over several seeds.

    python benchmarks/continual_digits.py --seeds 0 1 2 --output benchmarks/results/continual_digits.json
    python benchmarks/continual_digits.py --seeds 0 1 2 --methods exemplar_replay --update
    python benchmarks/continual_digits.py --recipe recipes/clip_shapes.py --names_only_last 0 \
        --methods finetune lwf pmi --output benchmarks/results/continual_shapes.json --workdir runs/continual_shapes

``--settings hf_pmi_0.1`` runs the recipe as hf_pmi 0.1 did (the settings the committed
``continual_digits.json`` and ``continual_shapes.json`` were measured with): LoRA on every encoder layer,
and for the inverting methods every class inverted again after every task, class by class, at the full
budget. The default, ``recipe``, runs the recipe's own defaults.

``--update`` runs only the given methods and keeps every other run already in ``--output`` (the
recipe arguments must be the same: the script refuses otherwise).

Each (method, seed) is one run of the recipe in its own process (one thread each, `--jobs` at a
time). The recipe's letters backbone is pre-trained by the first run that needs it (~2 min, once;
the others wait for it) and cached. Writes per-method mean and std of A_last, A_avg and
forgetting, the inversion seconds per task, every run's numbers, prints a table and saves a bar
plot next to the JSON.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["finetune", "lwf", "feature_replay", "full_inversion", "pmi", "exemplar_replay", "joint"]
# hf_pmi 0.1's recipe defaults: LoRA on every layer (all methods); synthesis and budget (the inverting ones)
HF_PMI_0_1 = {"all": ["--lora_from_block", "1"],
              "inverting": ["--buffer_incremental", "false", "--buffer_shuffle", "false", "--inversion_layer_steps",
                            "50", "--inversion_first_block_steps", "200", "--inversion_upsample_at", "50", "100",
                            "150", "--inversion_refine_steps", "100"]}


def settings_flags(settings: str, method: str) -> list[str]:
    if settings == "recipe":
        return []
    return HF_PMI_0_1["all"] + (HF_PMI_0_1["inverting"] if method in ("pmi", "full_inversion") else [])


def run_one(method, seed, workdir, recipe, extra, settings="recipe"):
    out = os.path.join(workdir, f"{method}-seed{seed}")
    cmd = [sys.executable, recipe, "--output_dir", out, "--method", method,
           "--seed", str(seed), "--disable_tqdm", "true", *settings_flags(settings, method), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    inversion = [log.get("inversion_seconds") for log in result["method_logs"] if "inversion_seconds" in log]
    print(f"{method:>15} seed {seed}: A_last {result['a_last']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return {"method": method, "seed": seed, "a_last": result["a_last"], "a_avg": result["a_avg"],
            "forgetting": result["forgetting"], "wall_seconds": result["wall_seconds"],
            "inversion_seconds_per_task": inversion, "accuracy_matrix": result["accuracy_matrix"]}


def summarise(runs):
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        entry = {}
        for key in ("a_last", "a_avg", "forgetting", "wall_seconds"):
            values = [r[key] for r in mine]
            entry[key] = {"mean": statistics.mean(values), "std": statistics.pstdev(values)}
        # accuracy on a task right after learning it (tasks 1..T-1), and on the old tasks at the end
        just_learned = [r["accuracy_matrix"][i][i] for r in mine for i in range(1, len(r["accuracy_matrix"]))]
        old_at_end = [a for r in mine for a in r["accuracy_matrix"][-1][:-1]]
        entry["new_task_accuracy"] = statistics.mean(just_learned) if just_learned else None
        entry["old_task_accuracy_at_end"] = statistics.mean(old_at_end) if old_at_end else None
        inv = [s for r in mine for s in r["inversion_seconds_per_task"]]
        entry["inversion_seconds_per_task"] = statistics.mean(inv) if inv else None
        summary[method] = entry
    return summary


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, key in enumerate(("a_last", "a_avg")):
        means = [summary[m][key]["mean"] for m in methods]
        stds = [summary[m][key]["std"] for m in methods]
        ax.bar([i + 0.4 * k for i in range(len(methods))], means, 0.4, yerr=stds, label=key, capsize=3)
    ax.set_xticks([i + 0.2 for i in range(len(methods))], methods, rotation=20)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "continual_digits.json"))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "continual_digits"))
    parser.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "clip_digits.py"),
                        help="The recipe each run calls; arguments this script does not know go to it.")
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time (one CPU thread each).")
    parser.add_argument("--update", action="store_true", help="Keep the other methods' runs already in --output.")
    parser.add_argument("--settings", choices=["recipe", "hf_pmi_0.1"], default="recipe",
                        help="'recipe': the recipe's defaults; 'hf_pmi_0.1': as hf_pmi 0.1 ran it (module docstring).")
    args, extra = parser.parse_known_args()  # anything else goes to the recipe
    recipe = os.path.relpath(os.path.abspath(args.recipe), ROOT)
    command = " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    kept, commands = [], [command]
    if args.update and os.path.exists(args.output):
        with open(args.output) as f:
            previous = json.load(f)
        # files written before --settings existed were measured with the recipes' defaults of then: hf_pmi 0.1's
        if (previous["recipe_args"] != extra or previous.get("recipe", "recipes/clip_digits.py") != recipe
                or previous.get("settings", "hf_pmi_0.1") != args.settings):
            raise SystemExit(f"--update: {args.output} was made with {previous.get('recipe', 'recipes/clip_digits.py')}, "
                             f"arguments {previous['recipe_args']} and --settings {previous.get('settings', 'hf_pmi_0.1')}, "
                             f"not {recipe} {extra} --settings {args.settings}; runs with other settings cannot share one table.")
        kept = [r for r in previous["runs"] if r["method"] not in args.methods]
        commands = previous.get("commands", [previous.get("command")]) + commands
    t0 = time.time()
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = kept + list(pool.map(lambda job: run_one(*job, args.workdir, args.recipe, extra, args.settings), jobs))
    order = {m: i for i, m in enumerate(METHODS)}
    runs.sort(key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
    summary = summarise(runs)
    report = {"summary": summary, "runs": runs, "seeds": sorted({r["seed"] for r in runs}), "recipe": recipe,
              "recipe_args": extra, "settings": args.settings,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
              "commands": commands, "total_seconds": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    plot(summary, os.path.splitext(args.output)[0] + ".png")
    print(f"\n{'method':>15} {'A_last':>15} {'A_avg':>15} {'forgetting':>15} {'inversion s/task':>17}")
    for m, e in summary.items():
        inv = f"{e['inversion_seconds_per_task']:.1f}" if e["inversion_seconds_per_task"] is not None else "-"
        print(f"{m:>15} " + " ".join(f"{e[k]['mean']:>8.3f} ± {e[k]['std']:.3f}" for k in ("a_last", "a_avg", "forgetting"))
              + f" {inv:>17}")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
