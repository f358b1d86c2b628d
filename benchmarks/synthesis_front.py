"""Accuracy per synthesis second: every way of building the replay buffer, on the digits demo and the shapes recipe.

    python benchmarks/synthesis_front.py --seeds 0 1 2 --jobs 2           # -> benchmarks/results/synthesis_front.json + .png
    python benchmarks/synthesis_front.py --recipes digits --variants today default --seeds 0
    python benchmarks/synthesis_front.py --paper_scale                     # -> benchmarks/results/synthesis_cost.json

Each run is one recipe run (`recipes/clip_digits.py`: 5 tasks of digits on the mini letters CLIP;
`recipes/clip_shapes.py --names_only_last 0`: 5 tasks of the 16 held-out shape-colour pairs on the
shapes CLIP), one CPU thread, ``--jobs`` at a time, with the recipe's own defaults except what the
variant sets (`VARIANTS`):

- ``today``: `pmi` as hf_pmi 0.1 ran it: every class inverted again after every task, class by class;
- ``budget`` (`pmi`, `full_inversion`): each class inverted once (kept), shuffled batches, at the
  recipe's inversion budget times ``budget`` (1, 1/2, 1/4, 1/16; `full_inversion` spends the passes of a
  `pmi` batch at the same budget);
- ``refresh``: as ``budget`` 1, the kept samples refined under each new model (25 refinement steps);
  ``block_control_refresh[_25]_budget_1/4``: the default's synthesis with 6 (25) such steps;
- ``samples_10``: twice the kept samples per class at a quarter of the budget (more, rougher samples);
- ``block``: replay at a deeper vision block k (tokens entering encoder layer k - 2), LoRA on the
  layers from k on; ``block_control``: replay at the patch maps with the same LoRA restriction;
- ``default``: the recipe as it is (the library's defaults), run on its own;
- ``reference``: `finetune`, `lwf` and `exemplar_replay` (5 real images per class; not data-free).

A run's ``inversion_seconds`` is the sum over its tasks of the synthesis time (every inversion and
refresh), ``inversion_passes`` the same in full-model passes (`hf_pmi.inversion.report`: independent
of the machine's load). Finished runs under ``--workdir`` are reused (`recipe_runs`). Writes
``{"runs": [...]}`` with one row per run (recipe, method, variant, budget, replay_block, incremental,
seed, a_last, a_avg, inversion_seconds, inversion_passes, wall_seconds) and a plot of A_last against
total inversion seconds (log x), one line per variant family.

``--paper_scale`` needs no training: the synthesis work of the CUB-200 and ImageNet-R 10 x 20 recipes
(ViT-B/16, the reference's inversion budget) in full-model passes, hf_pmi 0.1's synthesis against the
new default, and in seconds from the per-step costs ``benchmarks/inversion_efficiency.py --timing_only``
measured (`benchmarks/results/vitb16_timing.json`).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_runs import ROOT, run_recipe  # noqa: E402

RECIPES = {
    "digits": ("recipes/clip_digits.py", []),
    "shapes": ("recipes/clip_shapes.py", ["--names_only_last", "0"]),
}
# hf_pmi 0.1's inversion budget of both recipes ("budget 1"): steps per block, coarse-to-fine steps (doubled at
# 1/4, 1/2 and 3/4 of them) and refinement steps. The recipes' default since is budget 1/4 (`budget_flags(0.25)`).
RECIPE_BUDGET = {"layer_steps": 50, "first_block_steps": 200, "refine_steps": 100}
DEEP_BLOCK = 4  # tokens entering encoder layer 2 of the recipes' 4 layers: half the tower is inverted
# every variant pins the buffer and LoRA settings it measures, so that a later change of the defaults leaves it as it was
KEPT = ["--buffer_incremental", "true", "--buffer_shuffle", "true", "--buffer_refresh_steps", "0", "--buffer_dtype",
        "float32"]
TODAY = ["--buffer_incremental", "false", "--buffer_shuffle", "false", "--buffer_refresh_steps", "0", "--buffer_dtype",
         "float32"]


def budget_flags(scale: float) -> list[str]:
    """Flags of the recipes' inversion budget times `scale` (at least one step per stage)."""
    layer = max(1, round(RECIPE_BUDGET["layer_steps"] * scale))
    first = max(4, round(RECIPE_BUDGET["first_block_steps"] * scale))
    refine = max(1, round(RECIPE_BUDGET["refine_steps"] * scale))
    upsample = [str(max(1, first * q // 4)) for q in (1, 2, 3)]
    return ["--inversion_layer_steps", str(layer), "--inversion_first_block_steps", str(first),
            "--inversion_upsample_at", *upsample, "--inversion_refine_steps", str(refine)]


def _variant(method, budget=1.0, block=1, incremental=True, lora_from=1, extra=KEPT):
    """`lora_from` 1: LoRA on every layer (hf_pmi 0.1's recipes); DEEP_BLOCK: the upper half (the default since)."""
    flags = ["--method", method, "--lora_from_block", str(lora_from)]
    if method in ("pmi", "full_inversion"):
        flags += budget_flags(budget) + ["--inversion_start_block", str(block)] + list(extra)
    inverts = method in ("pmi", "full_inversion")
    return {"method": method, "budget": budget if inverts else None, "replay_block": block if inverts else None,
            "incremental": incremental if inverts else None, "lora_from_block": lora_from, "flags": flags}


VARIANTS = {
    "today": _variant("pmi", incremental=False, extra=TODAY),
    "pmi_budget_1": _variant("pmi"),
    "pmi_budget_1/2": _variant("pmi", 0.5),
    "pmi_budget_1/4": _variant("pmi", 0.25),
    "pmi_budget_1/16": _variant("pmi", 1 / 16),
    "full_inversion_budget_1": _variant("full_inversion"),
    "full_inversion_budget_1/4": _variant("full_inversion", 0.25),
    "full_inversion_budget_1/16": _variant("full_inversion", 1 / 16),
    "refresh": _variant("pmi", extra=[*KEPT, "--buffer_refresh_steps", str(RECIPE_BUDGET["refine_steps"] // 4)]),
    "block_control": _variant("pmi", lora_from=DEEP_BLOCK),
    "block_control_budget_1/4": _variant("pmi", 0.25, lora_from=DEEP_BLOCK),
    "block_control_budget_1/2": _variant("pmi", 0.5, lora_from=DEEP_BLOCK),
    "block_control_budget_1/16": _variant("pmi", 1 / 16, lora_from=DEEP_BLOCK),
    "block_control_full_inversion_budget_1/4": _variant("full_inversion", 0.25, lora_from=DEEP_BLOCK),
    "block_control_full_inversion_budget_1/2": _variant("full_inversion", 0.5, lora_from=DEEP_BLOCK),
    # twice the kept samples per class (the reference keeps 5) at a quarter of the budget: more, rougher samples
    "samples_10_budget_1/4": _variant("pmi", 0.25, lora_from=DEEP_BLOCK, extra=[*KEPT, "--sampling_per_class", "10"]),
    "block_control_refresh_budget_1/4": _variant("pmi", 0.25, lora_from=DEEP_BLOCK, extra=[
        *KEPT, "--buffer_refresh_steps", str(RECIPE_BUDGET["refine_steps"] // 16)]),
    "block_control_refresh_25_budget_1/4": _variant("pmi", 0.25, lora_from=DEEP_BLOCK, extra=[
        *KEPT, "--buffer_refresh_steps", str(RECIPE_BUDGET["refine_steps"] // 4)]),
    f"block_{DEEP_BLOCK}": _variant("pmi", block=DEEP_BLOCK, lora_from=DEEP_BLOCK),
    f"block_{DEEP_BLOCK}_budget_1/4": _variant("pmi", 0.25, block=DEEP_BLOCK, lora_from=DEEP_BLOCK),
    # the recipe as it is: each class inverted once, patch maps, budget 1/4, LoRA on the upper half
    "default": {"method": "pmi", "budget": 0.25, "replay_block": 1, "incremental": True,
                "lora_from_block": DEEP_BLOCK, "flags": ["--method", "pmi"]},
    # the references share the default's LoRA (upper half), so they compare like with like against it
    "finetune": _variant("finetune", lora_from=DEEP_BLOCK),
    "lwf": _variant("lwf", lora_from=DEEP_BLOCK),
    "exemplar_replay": _variant("exemplar_replay", lora_from=DEEP_BLOCK),
}


def run_one(recipe_name, variant, seed, workdir):
    recipe, recipe_flags = RECIPES[recipe_name]
    spec = VARIANTS[variant]
    out = os.path.join(workdir, recipe_name, variant.replace("/", "_"), f"seed{seed}")
    result = run_recipe(os.path.join(ROOT, recipe), out, [*recipe_flags, *spec["flags"], "--seed", str(seed)],
                        label=f"{recipe_name} {variant} seed {seed}")
    logs = result["method_logs"]
    return {"recipe": recipe_name, "method": spec["method"], "variant": variant, "budget": spec["budget"],
            "replay_block": spec["replay_block"], "incremental": spec["incremental"],
            "lora_from_block": spec["lora_from_block"], "seed": seed,
            "a_last": result["a_last"], "a_avg": result["a_avg"],
            "inversion_seconds": sum(log.get("inversion_seconds", 0.0) for log in logs),
            "inversion_passes": sum(log.get("inversion_full_model_passes", 0.0) for log in logs),
            "inverted_classes": sum(log.get("inverted_classes", 0) for log in logs),
            "wall_seconds": result["wall_seconds"], "accuracy_matrix": result["accuracy_matrix"]}


def summarise(runs):
    out = {}
    for key in dict.fromkeys((r["recipe"], r["variant"]) for r in runs):
        mine = [r for r in runs if (r["recipe"], r["variant"]) == key]
        entry = {"seeds": [r["seed"] for r in mine]}
        for field in ("a_last", "a_avg", "inversion_seconds", "inversion_passes", "wall_seconds"):
            values = [r[field] for r in mine]
            entry[field] = {"mean": statistics.mean(values), "std": statistics.pstdev(values)}
        out[f"{key[0]}/{key[1]}"] = entry
    return out


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    recipes = sorted({k.split("/", 1)[0] for k in summary})
    fig, axes = plt.subplots(1, len(recipes), figsize=(6 * len(recipes), 4.2), squeeze=False)
    families = {  # lines through the budgets of one kind of synthesis
        "pmi, LoRA on all layers": ["pmi_budget_1", "pmi_budget_1/2", "pmi_budget_1/4", "pmi_budget_1/16"],
        "full_inversion, LoRA on all layers": ["full_inversion_budget_1", "full_inversion_budget_1/4",
                                               "full_inversion_budget_1/16"],
        "pmi, LoRA on the upper half (budget 1/4: the default)": [
            "block_control", "block_control_budget_1/2", "default", "block_control_budget_1/16"],
        "full_inversion, LoRA on the upper half": ["block_control_full_inversion_budget_1/2",
                                                   "block_control_full_inversion_budget_1/4"],
        f"pmi at block {DEEP_BLOCK}": [f"block_{DEEP_BLOCK}", f"block_{DEEP_BLOCK}_budget_1/4"],
    }
    singles = {"today": "s", "refresh": "^", "block_control_refresh_budget_1/4": "v",
               "block_control_refresh_25_budget_1/4": "<", "samples_10_budget_1/4": "D",
               "default": "*"}
    for ax, recipe in zip(axes[0], recipes):
        for label, members in families.items():
            points = sorted((e["inversion_seconds"]["mean"], e["a_last"]["mean"], e["a_last"]["std"])
                            for e in (summary.get(f"{recipe}/{m}") for m in members) if e)
            if points:
                xs, ys, es = zip(*points)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        for name, marker in singles.items():
            e = summary.get(f"{recipe}/{name}")
            if e:
                ax.errorbar([e["inversion_seconds"]["mean"]], [e["a_last"]["mean"]], yerr=[e["a_last"]["std"]],
                            marker=marker, markersize=10 if name == "default" else 7, capsize=3, linestyle="none",
                            label=name)
        for name in ("finetune", "lwf", "exemplar_replay"):
            e = summary.get(f"{recipe}/{name}")
            if e:
                ax.axhline(e["a_last"]["mean"], linestyle=":", color="grey")
                ax.text(0.01, e["a_last"]["mean"], name, fontsize=7, va="bottom", color="grey",
                        transform=ax.get_yaxis_transform())  # x in axes fractions, y in data
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("total inversion seconds per run (log)")
        ax.set_ylabel("A_last")
        ax.set_title(f"{recipe}: accuracy per synthesis second")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----- the paper's scale ---------------------------------------------------------------------------
def paper_scale(timing_path):
    """Synthesis work of the CUB-200 / ImageNet-R 10 x 20 recipes on ViT-B/16, hf_pmi 0.1 against the default."""
    import torch
    from transformers import CLIPVisionConfig

    from hf_pmi.blocks import VisionBlocks
    from hf_pmi.inversion import InversionConfig, passes_per_chunk
    from hf_pmi.methods.pmi import PMIConfig

    with open(timing_path) as f:
        timing = json.load(f)
    torch.manual_seed(0)
    from transformers import CLIPConfig, CLIPModel

    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16)
    config = CLIPConfig(vision_config=vision.to_dict(), projection_dim=512)
    with torch.device("meta"):  # costs need shapes only
        blocks = VisionBlocks(CLIPModel(config))
    default = PMIConfig()
    steps = timing["seconds_per_step"]
    rows = []
    for name, classes_per_task, tasks in (("CUB-200 10 x 20", 20, 10), ("ImageNet-R 10 x 20", 20, 10)):
        per_class = default.sampling.per_class
        for label, incremental, block in (("hf_pmi 0.1 (every class again after every task)", False, 1),
                                          ("default (each class once)", True, default.inversion.start_block)):
            inversion = InversionConfig(start_block=block)
            chunk = passes_per_chunk(blocks, inversion)
            total_chunks = total_targets = 0
            for t in range(tasks):
                targets = classes_per_task * per_class * (1 if incremental else t + 1)
                total_chunks += math.ceil(targets / inversion.batch_size)
                total_targets += targets
            passes = total_chunks * chunk
            # seconds: a pass of one target costs a full-model step of the measured batch divided by that batch
            seconds = chunk * total_targets * steps["full_model"] / timing["batch"]
            rows.append({"recipe": name, "synthesis": label, "inverted_targets": total_targets, "chunks": total_chunks,
                         "passes_per_chunk": chunk, "full_model_passes": passes, "seconds_one_cpu_thread": seconds})
    # the kept buffer: `per_class` patch maps (block 1) per class, float32 or bfloat16 (--buffer_dtype)
    values = default.sampling.per_class * math.prod(blocks.input_shape(1))
    buffer = {"samples_per_class": default.sampling.per_class, "sample_shape": list(blocks.input_shape(1)),
              "mb_per_class_float32": values * 4 / 1e6, "mb_per_class_bfloat16": values * 2 / 1e6}
    return {"rows": rows, "buffer_vitb16": buffer, "timing": os.path.relpath(os.path.abspath(timing_path), ROOT), "machine_of_timing": timing.get("machine")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time (one CPU thread each).")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "synthesis_front"))
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "synthesis_front.json"))
    parser.add_argument("--paper_scale", action="store_true", help="Only the cost table at the paper's scale.")
    parser.add_argument("--timing", default=os.path.join(ROOT, "benchmarks", "results", "vitb16_timing.json"))
    args = parser.parse_args()
    command = " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]])
    if args.paper_scale:
        report = {**paper_scale(args.timing), "command": command}
        path = os.path.join(os.path.dirname(os.path.abspath(args.output)), "synthesis_cost.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        for row in report["rows"]:
            print(f"{row['recipe']:>20} | {row['synthesis']:<48} | {row['full_model_passes']:>9.0f} passes | "
                  f"{row['seconds_one_cpu_thread'] / 3600:>7.1f} h")
        b = report["buffer_vitb16"]
        print(f"ViT-B/16 replay buffer per class: {b['samples_per_class']} x {b['sample_shape']} = "
              f"{b['mb_per_class_float32']:.2f} MB float32, {b['mb_per_class_bfloat16']:.2f} MB bfloat16")
        print(f"-> {path}")
        return
    jobs = [(r, v, s) for r in args.recipes for s in args.seeds for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: run_one(*job, args.workdir), jobs))
    previous, commands = [], []
    if os.path.exists(args.output):  # other recipes' or variants' rows of an earlier call are kept, with its command
        with open(args.output) as f:
            earlier = json.load(f)
        fresh = {(x["recipe"], x["variant"], x["seed"]) for x in runs}
        previous = [r for r in earlier["runs"] if (r["recipe"], r["variant"], r["seed"]) not in fresh]
        commands = [c for c in earlier.get("commands", []) if c != command] if previous else []
    runs = previous + runs
    summary = summarise(runs)
    report = {"runs": runs, "summary": summary, "commands": [*commands, command],
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                         f"one torch thread per run, {args.jobs} runs at a time"}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    plot(summary, os.path.splitext(args.output)[0] + ".png")
    print(f"\n{'recipe/variant':>40} {'A_last':>15} {'inversion s':>16} {'passes':>10}")
    for key, e in summary.items():
        print(f"{key:>40} {e['a_last']['mean']:>8.3f} ± {e['a_last']['std']:.3f} "
              f"{e['inversion_seconds']['mean']:>9.1f} ± {e['inversion_seconds']['std']:>4.1f} "
              f"{e['inversion_passes']['mean']:>10.0f}")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
