"""New classes from their names only, on the shapes world: what training, projection and routing each add.

    python benchmarks/names_only.py --classes all --seeds 0 1 2 --output benchmarks/results/names_only.json
    python benchmarks/names_only.py --classes held_out --seeds 0 1 2 --output benchmarks/results/names_only_held_out.json

Protocols (5 tasks, orders drawn with the seed; tasks 0-3 learned from images with `pmi` on a LoRA-adapted
shapes CLIP, task 4 then added by name to that task-3 checkpoint as a user would,
`ContinualTrainer.from_pretrained(checkpoint, tasks=[names])`):

- ``all``: the 64 shape-colour pairs (48 seen in the shapes CLIP's pre-training, 16 not), 13/13/13/13/12
  classes, scored over all 64 names;
- ``held_out``: tasks 0-3 are the 48 pairs seen in pre-training (12 per task), task 4 twelve of the 16
  pairs the shapes CLIP never saw, all scored over the 60 names: the pre-trained CLIP knows the new names
  less well (its accuracy on them below 0.9), so there is room to gain.

Models, each scored on the test images of the new (task 4) and the old (tasks 0-3) classes, over all
classes:

- ``raw_clip``: the raw (pre-trained, adapter-free) shapes CLIP with its text prototypes;
- ``raw_projected``: the same with the new classes' projected class embeddings (`name_prototypes`: the
  mean of their projected targets, the modality gap taken off), no adapted model: the projection alone;
- ``zero_shot``: the task-3 model with the new names added to its classifier, no training;
- ``names_only``: after the names-only task with hf_pmi's settings (`NamesOnlyConfig()`);
- ``reference``: after the names-only task with the reference's (`NamesOnlyConfig(preset="reference")`);
- ``real``: after learning task 4 from its real images with `pmi` (the same replay losses), continued from
  the same checkpoint: what training on the true images gives with these losses.

Every one of the four adapted models is scored three ways, so that comparisons route both sides or
neither: ``<model>_adapted_*`` (its own logits), ``<model>_route_*`` (the new classes routed to the raw
CLIP with the projected class embeddings, `hf_pmi.routing.routed_probs`) and ``<model>_product_*``
(product of the raw CLIP's and the model's probabilities, `product_probs`); ``zero_shot_route_text_*``
routes with the text prototypes instead. ``names_only_*`` (no suffix) is the default's own scoring
(``NamesOnlyConfig().scoring``), checked to equal the model's ``prediction_logits``.

Per seed also: ``old_before`` (the task-3 model over its own classes), ``best_baseline_new`` (the higher of
``zero_shot_adapted_new`` and ``raw_clip_new``), ``gain`` (``names_only_new - best_baseline_new``),
``old_kept`` (``names_only_old >= old_before - 0.05``), the decomposition of the new-class gain over
zero-shot (``from_routing``: routing with text prototypes; ``from_projection``: projected instead of text
prototypes; ``from_training``: the trained model instead of the task-3 one, both routed as the default
scores; they sum to ``names_only_new - zero_shot_adapted_new``), and per trained run ``<run>_adapter_change``
(relative L2 change of its trainable weights from the task-3 checkpoint) and
``<run>_predictions_changed`` (fraction of the new and old test images whose adapted prediction differs
from the zero-shot model's). ``backbone_sha256``: the shapes CLIP's weights the numbers come from.

Finished runs (``<workdir>/seed<S>/{base/task-3,names_only/task-4,reference/task-4,real/task-4}``) are
reused, and so is a finished seed's ``result.json`` (delete it to rescore): delete a run to redo it. Each
seed runs in its own process (one CPU thread, ``--jobs`` at a time). Writes the JSON (per seed, mean and
population std) and a bar plot next to it.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ["zero_shot", "names_only", "reference", "real"]  # the adapted models
SCORINGS = ["adapted", "route", "product"]
KEYS = (["raw_clip_new", "raw_projected_new", "zero_shot_route_text_new"]
        + [f"{m}_{s}_new" for m in RUNS for s in SCORINGS]
        + ["names_only_new", "best_baseline_new", "gain", "from_routing", "from_projection", "from_training",
           "old_before", "raw_clip_old", "raw_projected_old", "zero_shot_route_text_old"]
        + [f"{m}_{s}_old" for m in RUNS for s in SCORINGS]
        + ["names_only_old"]
        + [f"{r}_{k}" for r in RUNS[1:] for k in ("adapter_change", "predictions_changed")])
OLD_MARGIN = 0.05  # the criterion: old_after >= old_before - 0.05


def protocol_tasks(classes, seed, per_class=60, test_per_class=30):
    """The 5 tasks of a protocol (module docstring): 'all' or 'held_out'."""
    import numpy as np

    from hf_pmi import split_class_incremental
    from hf_pmi.testing.shapes import ALL_CLASSES, HELD_OUT, SEEN, load_shapes_dataset

    if classes == "all":
        data = load_shapes_dataset(classes=list(ALL_CLASSES), per_class=per_class, test_per_class=test_per_class)
        return split_class_incremental(data, num_tasks=5, seed=seed)
    rs = np.random.RandomState(seed)
    order = [SEEN[i] for i in rs.permutation(len(SEEN))] + [HELD_OUT[i] for i in rs.permutation(len(HELD_OUT))[:12]]
    data = load_shapes_dataset(classes=order, per_class=per_class, test_per_class=test_per_class)
    names = data["train"].features["label"].names
    return split_class_incremental(data, num_tasks=5, class_order=[names.index(c) for c in order])


def backbone_sha256(cache_dir=None):
    """sha256 of the cached shapes CLIP's ``model.safetensors`` (the backbone every number here comes from)."""
    from hf_pmi.testing.backbones import PRETRAIN_STEPS
    from hf_pmi.testing.cache import cache_folder, shipped_folder

    kwargs = {"seed": 0, "steps": PRETRAIN_STEPS, "image_size": 32}
    folder = shipped_folder("shapes-clip-small", **kwargs) or cache_folder("shapes-clip-small", cache_dir, **kwargs)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def scores(model, dataset, label_map, processor, batch_size=128):
    """(adapted logits, raw CLIP's normalised image features, own prediction logits, labels) of `dataset`."""
    import torch
    import torch.nn.functional as F

    from hf_pmi.blocks import VisionBlocks
    from hf_pmi.data import ContinualCollator

    collate = ContinualCollator(processor.image_processor, label_map)
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            out = model(pixel_values=batch["pixel_values"])
            with model.raw_clip() as clip:
                raw = F.normalize(VisionBlocks(clip).features(batch["pixel_values"]).float(), dim=-1)
            parts.append((out.logits.float(), raw, out.prediction_logits.float(), batch["labels"]))
    return [torch.cat(p) for p in zip(*parts)]


def trainable_weights(folder):
    """The checkpoint's adapter weights (LoRA and saved modules), by name."""
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


def adapter_change(before, after):
    """Relative L2 change of the weights both hold: ||after - before|| / ||before||."""
    import torch

    keys = sorted(set(before) & set(after))
    diff = torch.sqrt(sum(((after[k].float() - before[k].float()) ** 2).sum() for k in keys))
    return float(diff / torch.sqrt(sum((before[k].float() ** 2).sum() for k in keys)))


def run_seed(seed, workdir, a):
    """One seed of the protocol, in this process; returns its numbers."""
    import torch
    from datasets import concatenate_datasets
    from peft import LoraConfig
    from transformers import set_seed

    from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer
    from hf_pmi.inversion import InversionConfig
    from hf_pmi.methods.pmi import PMIConfig
    from hf_pmi.modeling import class_text_embeddings
    from hf_pmi.names_only import NamesOnlyConfig, names_only_tasks
    from hf_pmi.replay import ReplayConfig
    from hf_pmi.routing import product_probs, routed_probs
    from hf_pmi.testing import build_processor
    from hf_pmi.testing.backbones import shapes_clip
    from hf_pmi.testing.shapes import SHAPES_TEMPLATES

    t0 = time.time()
    processor = build_processor()
    tasks = protocol_tasks(a.classes, seed, a.per_class, a.test_per_class)
    # the recipe's budgets (recipes/clip_shapes.py): small tasks, a CPU-sized inversion
    method_config = PMIConfig(
        replay=ReplayConfig(batch_size=32, grid_samples=0),
        inversion=InversionConfig(layer_steps=50, first_block_steps=200, upsample_at=[50, 100, 150], refine_steps=100))

    def args_for(name):
        return ContinualConfig(output_dir=os.path.join(workdir, f"seed{seed}", name), method="pmi", seed=seed,
                               num_train_epochs=a.epochs, per_device_train_batch_size=32, warmup_steps=10,
                               disable_tqdm=True, logging_steps=10**9)

    # tasks 0-3 from images, once per seed (a finished base run of an earlier call is reused)
    checkpoint = os.path.join(workdir, f"seed{seed}", "base", "task-3")
    if not os.path.isdir(checkpoint):
        clip = shapes_clip(a.backbone_dir)  # pre-training (first use) seeds itself
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=r".*vision_model.*\.(q_proj|v_proj|fc1|fc2)",
                          modules_to_save=["text_projection"])
        set_seed(seed)  # LoRA weights are drawn in from_clip, before the Trainer seeds anything
        model = ContinualCLIP.from_clip(clip, templates=SHAPES_TEMPLATES, lora=lora)
        ContinualTrainer(model=model, args=args_for("base"), tasks=dataclasses.replace(tasks, tasks=tasks.tasks[:4]),
                         processing_class=processor, method_config=method_config).train()
    if a.stage == "base":
        return {"seed": seed, "seconds": time.time() - t0}

    def after_task4(name, tasks_4):
        """The model after task 4 learned from the task-3 checkpoint as a user would (from_pretrained); a
        finished run of an earlier call (``<workdir>/seed<S>/<name>/task-4``) is loaded, not rerun."""
        done = os.path.join(workdir, f"seed{seed}", name, "task-4")
        if not os.path.isdir(done):
            ContinualTrainer.from_pretrained(checkpoint, tasks=tasks_4, args=args_for(name),
                                             method_config=method_config).train()
        return ContinualCLIP.from_pretrained(done), done

    new_names = tasks[4].class_names
    n = len(new_names)
    zero_shot = ContinualCLIP.from_pretrained(checkpoint)
    old_test = concatenate_datasets([t.test for t in tasks.tasks[:4]])
    tests = {"new": tasks[4].test, "old": old_test}
    old_before = scores(zero_shot, old_test, tasks.label_map, processor)
    result = {"seed": seed, "classes": a.classes, "names_only_classes": new_names,
              "old_before": old_before[0].argmax(-1).eq(old_before[3]).float().mean().item()}
    zero_shot.add_classes(new_names, processor.tokenizer)  # zero-shot: the new names added, no training
    default = NamesOnlyConfig()
    models = {"zero_shot": (zero_shot, checkpoint),
              "names_only": after_task4("names_only", names_only_tasks(new_names, config=default)),
              "reference": after_task4("reference", names_only_tasks(new_names,
                                                                     config=NamesOnlyConfig(preset="reference")))}
    real_tasks = dataclasses.replace(  # the new classes from their real images, continued from the same checkpoint
        tasks, tasks=[dataclasses.replace(tasks[4], task_id=0, class_ids=list(range(n)))],
        class_order=tasks.class_order[-n:], class_names=tasks.class_names[-n:])
    models["real"] = after_task4("real", real_tasks)

    names_only = models["names_only"][0]
    c = names_only.num_classes
    routed = torch.arange(c) >= c - n
    with torch.no_grad(), names_only.raw_clip() as clip:  # the raw CLIP's classifiers over all names
        text = class_text_embeddings(clip, names_only.prompt_ids, names_only.prompt_mask).float()
        scale = names_only.logit_scale.item()
    assert names_only.routed_classes == list(range(c - n, c)), "the default routes its names-only classes"
    projected = names_only.router.classifier(text)  # text prototypes, the new rows the default's class embeddings
    per = {part: {name: scores(model, data, tasks.label_map, processor) for name, (model, _) in models.items()}
           for part, data in tests.items()}
    for part in tests:
        raw = per[part]["zero_shot"][1]  # the raw CLIP is the same in every model (its adapters disabled)
        labels = per[part]["zero_shot"][3]
        acc = lambda logits: logits.argmax(-1).eq(labels).float().mean().item()  # noqa: E731
        raw_text, raw_projected = scale * raw @ text.t(), scale * raw @ projected.t()
        result[f"raw_clip_{part}"], result[f"raw_projected_{part}"] = acc(raw_text), acc(raw_projected)
        result[f"zero_shot_route_text_{part}"] = acc(routed_probs(raw_text, per[part]["zero_shot"][0], routed))
        for name in models:
            logits = per[part][name][0]
            result[f"{name}_adapted_{part}"] = acc(logits)
            result[f"{name}_route_{part}"] = acc(routed_probs(raw_projected, logits, routed))
            result[f"{name}_product_{part}"] = acc(product_probs(raw_projected, logits))
        own = per[part]["names_only"][2]
        result[f"names_only_{part}"] = acc(own)
        # the model's own prediction_logits against the benchmark's recomputation of its scoring
        logits = per[part]["names_only"][0]
        recomputed = {"adapted": logits, "route": routed_probs(raw_projected, logits, routed),
                      "product": product_probs(raw_projected, logits)}[default.scoring]
        result[f"own_scoring_check_{part}"] = own.argmax(-1).eq(recomputed.argmax(-1)).float().mean().item()
    result["best_baseline_new"] = max(result["zero_shot_adapted_new"], result["raw_clip_new"])
    result["gain"] = result["names_only_new"] - result["best_baseline_new"]
    result["old_kept"] = result["names_only_old"] >= result["old_before"] - OLD_MARGIN
    scoring = default.scoring
    result["from_routing"] = result["zero_shot_route_text_new"] - result["zero_shot_adapted_new"]
    result["from_projection"] = result[f"zero_shot_{scoring}_new"] - result["zero_shot_route_text_new"]
    result["from_training"] = result["names_only_new"] - result[f"zero_shot_{scoring}_new"]
    before = trainable_weights(checkpoint)
    for name in RUNS[1:]:
        result[f"{name}_adapter_change"] = adapter_change(before, trainable_weights(models[name][1]))
        changed = [per[p][name][0].argmax(-1).ne(per[p]["zero_shot"][0].argmax(-1)) for p in tests]
        result[f"{name}_predictions_changed"] = torch.cat(changed).float().mean().item()
    result["backbone_sha256"] = backbone_sha256(a.backbone_dir)
    result["seconds"] = time.time() - t0
    return result


def plot(mean, std, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["raw_clip", "raw_projected"] + [f"{m}_{s}" for m in RUNS for s in SCORINGS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
    for ax, part in zip(axes, ("new", "old")):
        keys = [f"{r}_{part}" for r in rows]
        colours = ["silver", "grey"] + [c for c in ("tab:orange", "tab:blue", "tab:purple", "tab:green")
                                        for _ in SCORINGS]
        ax.bar(range(len(keys)), [mean[k] for k in keys], yerr=[std[k] for k in keys], capsize=2, color=colours)
        ax.set_xticks(range(len(keys)), rows, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{part} classes")
        ax.set_ylim(0.5, 1)
    axes[0].set_ylabel("accuracy (mean ± std over seeds)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=None,
                        help="Default: benchmarks/results/names_only.json (all) or names_only_held_out.json (held_out).")
    parser.add_argument("--workdir", default=None, help="Default: runs/names_only_<classes>.")
    parser.add_argument("--backbone_dir", default=None, help="Cache of the shapes CLIP (default $HF_PMI_CACHE or ~/.cache/hf_pmi).")
    parser.add_argument("--jobs", type=int, default=2, help="Seeds at a time (one CPU thread each).")
    parser.add_argument("--epochs", type=float, default=6, help="Epochs of each task learned from images.")
    parser.add_argument("--per_class", type=int, default=60, help="Training images per class.")
    parser.add_argument("--test_per_class", type=int, default=30)
    parser.add_argument("--classes", choices=["all", "held_out"], default="all",
                        help="'all': the 64 shape-colour pairs; 'held_out': 48 seen pairs, then 12 never-seen ones by name.")
    parser.add_argument("--stage", choices=["base", "all"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--one_seed", type=int, default=None, help=argparse.SUPPRESS)  # worker mode
    a = parser.parse_args()
    suffix = "" if a.classes == "all" else "_held_out"
    a.output = a.output or os.path.join(ROOT, "benchmarks", "results", f"names_only{suffix}.json")
    a.workdir = a.workdir or os.path.join(ROOT, "runs", f"names_only_{a.classes}")
    if a.one_seed is not None:
        result = run_seed(a.one_seed, a.workdir, a)
        if a.stage == "all":
            with open(os.path.join(a.workdir, f"seed{a.one_seed}", "result.json"), "w") as f:
                json.dump(result, f, indent=2)
        print(json.dumps(result))
        return
    t0 = time.time()
    forwarded = [arg for arg in sys.argv[1:]]

    def worker(seed):
        done = os.path.join(a.workdir, f"seed{seed}", "result.json")
        if os.path.exists(done):  # a finished seed of an earlier call with the same --workdir
            with open(done) as f:
                result = json.load(f)
            print(f"seed {seed}: reused {done}", flush=True)
            return result
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--workdir", a.workdir, "--one_seed", str(seed)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"seed {seed} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"seed {seed}: gain {result.get('gain', float('nan')):.3f} ({result['seconds']:.0f} s)", flush=True)
        return result

    with ThreadPoolExecutor(a.jobs) as pool:
        seeds = list(pool.map(worker, a.seeds))
    if a.stage == "base":
        return
    mean = {k: statistics.mean(s[k] for s in seeds) for k in KEYS}
    std = {k: statistics.pstdev([s[k] for s in seeds]) for k in KEYS}
    hashes = sorted({s["backbone_sha256"] for s in seeds})
    report = {"seeds": seeds, "mean": mean, "std": std, "backbone_sha256": hashes[0] if len(hashes) == 1 else hashes,
              "acceptance": {"gain_mean": mean["gain"], "gain_every_seed": min(s["gain"] for s in seeds) > 0,
                             "old_kept_every_seed": all(s["old_kept"] for s in seeds)},
              "command": " ".join([os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
              "total_seconds": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(report, f, indent=2)
    plot(mean, std, os.path.splitext(a.output)[0] + ".png", f"names-only task, protocol '{a.classes}' (shapes world)")
    print("\n" + "\n".join(f"{k:>30}: {mean[k]:.3f} ± {std[k]:.3f}  " + " ".join(f"{s[k]:.3f}" for s in seeds)
                           for k in KEYS) + f"\n-> {a.output}")


if __name__ == "__main__":
    main()
