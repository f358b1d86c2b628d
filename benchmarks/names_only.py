"""New classes from their names only, on the shapes world (recipes/clip_shapes.py's protocol).

    python benchmarks/names_only.py --seeds 0 1 2 --output benchmarks/results/names_only.json

Per seed: the shapes world's classes (``--classes all``: the 64 shape-colour pairs, 48 of them seen by
the pre-trained shapes CLIP; ``held_out``: only the 16 it never saw) cut into 5 tasks (class order
drawn with the seed). Tasks 0-3 are learned from images with `pmi` on a LoRA-adapted shapes CLIP;
task 4's classes are then added to that task-3 checkpoint by name, as a user would
(`ContinualTrainer.from_pretrained(checkpoint, tasks=[names])`). With ``held_out`` the last task
has 3 classes that the task-3 model already scores at 0.94-0.99 zero-shot (no room for a gain);
with ``all`` it has 12 among 64 names, which it scores at 0.75-0.85. Measured:

- ``zero_shot_new``: accuracy on task 4's test images of the task-3 model with the new names added to
  its classifier (no training), over all classes;
- ``names_only_new`` / ``old_after``: on the new / old (tasks 0-3) test images after the names-only
  task with hf_pmi's settings (`NamesOnlyConfig()`: the new classes routed to the raw CLIP at
  inference); ``unrouted_*``: the same model with routing off (the trained weights alone);
  ``reference_names_only_new`` /
  ``reference_old_after``: the same with the reference's (`NamesOnlyConfig(preset="reference")`);
- ``real_data_new`` / ``real_old_after``: after learning task 4 from its real images with `pmi`,
  continued from the same checkpoint (with the same losses: no upper bound on this world, see
  docs/names_only.md);
- ``old_before``: the task-3 model on the old test images over its own classes
  (``old_before_with_new_names``: with the new names already in its classifier);
- ``raw_clip_new`` / ``raw_clip_old``: the raw (pre-trained, adapter-free) shapes CLIP over all names
  on the same test images: the knowledge that names-only training can draw on;
- ``gain``: ``names_only_new - zero_shot_new`` per seed (the classes differ between seeds, so the
  spread of the gain, not of the accuracies, tells a gain from noise).

A seed whose ``<workdir>/seed<S>/result.json`` exists (a finished earlier call) is reused, not rerun,
and so are finished runs (``<workdir>/seed<S>/{base/task-3,names_only/task-4,...}``): delete one to
redo it. Each seed runs in its own process (one CPU thread, ``--jobs`` at a time); the shapes CLIP is
pre-trained by the first one that needs it and cached. Writes the JSON (per seed, mean and population std) and a bar plot next to it.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["raw_clip_new", "zero_shot_new", "names_only_new", "unrouted_names_only_new", "reference_names_only_new",
        "real_data_new", "old_before", "old_after", "unrouted_old_after", "reference_old_after", "real_old_after",
        "gain"]


def accuracy(model, dataset, label_map, processor, batch_size=128, routed=True):
    """Accuracy of `model` (over all its classes) on `dataset`, labels mapped by `label_map`; with
    ``routed=False`` by the adapted model's own logits (a router, if any, left out)."""
    import torch

    from hf_pmi.data import ContinualCollator

    collate = ContinualCollator(processor.image_processor, label_map)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            out = model(pixel_values=batch["pixel_values"])
            pred = (out.prediction_logits if routed else out.logits).argmax(-1)
            correct += int((pred == batch["labels"]).sum())
            total += len(pred)
    return correct / total


def run_seed(seed, workdir, a):
    """One seed of the protocol, in this process; returns its numbers."""
    from datasets import concatenate_datasets
    from peft import LoraConfig
    from transformers import set_seed

    from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
    from hf_pmi.inversion import InversionConfig
    from hf_pmi.methods.pmi import PMIConfig
    from hf_pmi.names_only import NamesOnlyConfig, names_only_tasks
    from hf_pmi.replay import ReplayConfig
    from hf_pmi.testing import build_processor
    from hf_pmi.testing.backbones import shapes_clip
    from hf_pmi.testing.shapes import ALL_CLASSES, SHAPES_TEMPLATES, load_shapes_dataset

    t0 = time.time()
    processor = build_processor()
    classes = list(ALL_CLASSES) if a.classes == "all" else None  # None: the 16 held-out pairs
    data = load_shapes_dataset(classes=classes, per_class=a.per_class, test_per_class=a.test_per_class)
    tasks = split_class_incremental(data, num_tasks=5, seed=seed)
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
    old_test = concatenate_datasets([t.test for t in tasks.tasks[:4]])
    new_test, new_names = tasks[4].test, tasks[4].class_names
    before = ContinualCLIP.from_pretrained(checkpoint)
    old_before = accuracy(before, old_test, tasks.label_map, processor)  # over its own (old) classes
    before.add_classes(new_names, processor.tokenizer)  # zero-shot: the new names added, no training
    result = {"seed": seed, "names_only_classes": new_names, "old_before": old_before,
              "zero_shot_new": accuracy(before, new_test, tasks.label_map, processor),
              "old_before_with_new_names": accuracy(before, old_test, tasks.label_map, processor)}

    def after_task4(name, tasks_4):
        """The model after task 4 learned from the task-3 checkpoint as a user would (from_pretrained); a
        finished run of an earlier call (``<workdir>/seed<S>/<name>/task-4``) is loaded, not rerun."""
        done = os.path.join(workdir, f"seed{seed}", name, "task-4")
        if os.path.isdir(done):
            return ContinualCLIP.from_pretrained(done)
        trainer = ContinualTrainer.from_pretrained(checkpoint, tasks=tasks_4, args=args_for(name),
                                                   method_config=method_config)
        trainer.train()
        return trainer.accelerator.unwrap_model(trainer.model)

    def new_and_old(model, routed=True):
        return (accuracy(model, new_test, tasks.label_map, processor, routed=routed),
                accuracy(model, old_test, tasks.label_map, processor, routed=routed))

    # the raw (pre-trained, adapter-free) CLIP over all names: what names-only training can learn from
    raw = ContinualCLIP.from_clip(shapes_clip(a.backbone_dir), templates=SHAPES_TEMPLATES)
    raw.add_classes(tasks.class_names, processor.tokenizer)
    result["raw_clip_new"], result["raw_clip_old"] = new_and_old(raw)
    names_only = after_task4("names_only", names_only_tasks(new_names, config=NamesOnlyConfig()))
    result["names_only_new"], result["old_after"] = new_and_old(names_only)
    # the trained weights alone
    result["unrouted_names_only_new"], result["unrouted_old_after"] = new_and_old(names_only, routed=False)
    result["gain"] = result["names_only_new"] - result["zero_shot_new"]
    result["reference_names_only_new"], result["reference_old_after"] = new_and_old(
        after_task4("reference", names_only_tasks(new_names, config=NamesOnlyConfig(preset="reference"))))
    # the new classes from their real images (the same losses), continued from the same checkpoint
    n = len(tasks[4].class_ids)
    real_tasks = dataclasses.replace(
        tasks, tasks=[dataclasses.replace(tasks[4], task_id=0, class_ids=list(range(n)))],
        class_order=tasks.class_order[-n:], class_names=tasks.class_names[-n:])
    result["real_data_new"], result["real_old_after"] = new_and_old(after_task4("real", real_tasks))
    result["seconds"] = time.time() - t0
    return result


def plot(mean, std, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar(range(len(KEYS)), [mean[k] for k in KEYS], yerr=[std[k] for k in KEYS], capsize=3,
           color=["silver", "grey", "tab:blue", "cornflowerblue", "lightsteelblue", "tab:green", "tab:orange",
                  "tab:red", "salmon", "mistyrose", "tab:olive", "black"])
    ax.set_xticks(range(len(KEYS)), KEYS, rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(min(0, min(mean[k] - std[k] for k in KEYS)), 1)
    ax.set_title("names-only task (shapes world, mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "names_only.json"))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "names_only"))
    parser.add_argument("--backbone_dir", default=None, help="Cache of the shapes CLIP (default $HF_PMI_CACHE or ~/.cache/hf_pmi).")
    parser.add_argument("--jobs", type=int, default=2, help="Seeds at a time (one CPU thread each).")
    parser.add_argument("--epochs", type=float, default=6, help="Epochs of each task learned from images.")
    parser.add_argument("--per_class", type=int, default=60, help="Training images per class.")
    parser.add_argument("--test_per_class", type=int, default=30)
    parser.add_argument("--classes", choices=["all", "held_out"], default="all",
                        help="'all': the 64 shape-colour pairs; 'held_out': the 16 the shapes CLIP never saw.")
    parser.add_argument("--one_seed", type=int, default=None, help=argparse.SUPPRESS)  # worker mode
    a = parser.parse_args()
    if a.one_seed is not None:
        result = run_seed(a.one_seed, a.workdir, a)
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
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--one_seed", str(seed)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"seed {seed} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"seed {seed}: " + "  ".join(f"{k} {result[k]:.3f}" for k in KEYS) + f"  ({result['seconds']:.0f} s)",
              flush=True)
        return result

    with ThreadPoolExecutor(a.jobs) as pool:
        seeds = list(pool.map(worker, a.seeds))
    mean = {k: statistics.mean(s[k] for s in seeds) for k in KEYS}
    std = {k: statistics.pstdev([s[k] for s in seeds]) for k in KEYS}
    report = {"seeds": seeds, "mean": mean, "std": std,
              "command": " ".join([os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
              "total_seconds": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(report, f, indent=2)
    plot(mean, std, os.path.splitext(a.output)[0] + ".png")
    print("\n" + "\n".join(f"{k:>15}: {mean[k]:.3f} ± {std[k]:.3f}" for k in KEYS) + f"\n-> {a.output}")


if __name__ == "__main__":
    main()
