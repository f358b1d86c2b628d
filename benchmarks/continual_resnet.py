"""Data-free class-incremental learning of a ResNet trained from scratch (issues 22 and 30: the paper's ResNet path).

    OMP_NUM_THREADS=1 python benchmarks/continual_resnet.py --seeds 0 1 2 --jobs 1 --methods finetune lwf pmi \
        full_inversion --blocks_per_stage 3 --later_epochs 10 --workdir runs/continual_resnet30
        # -> benchmarks/results/continual_resnet.json (docs/resnet.md, "After issue 30")

World: the offline fonts letters (`hf_pmi.testing.fonts`: 20 letters in many faces, colours and
backgrounds, 16 px), ``--train_per_class`` training and 50 test images per letter (test images of
another seed), normalised by the per-channel moments of the first task's training images (all a
continual learner has at the start). 5 tasks of 4 letters, the class order shuffled by the seed.
Model: `ResNet32ForImageClassification` (``--blocks_per_stage`` 5: ResNet-32, 3: ResNet-20) from scratch, seeded.
Loop: `hf_pmi.resnet.continual.learn_tasks` (each phase one `transformers.Trainer.train()`, given
``max_grad_norm=0``: the reference never clips, where Trainer's default would clip at 1.0; one step per
batch; bit-equal to the hand-written loop before issue 30, so earlier results stay valid) with the reference's choices by default (``--schedule staged``:
the first task ``--first_epochs`` (60) at lr 0.1, x0.1 at 40 % / 60 %; later tasks ``--later_epochs`` split
20 : 20 : 120 over the stages; ``--regenerate 1``: the pool re-fitted and inverted anew after every task;
``--selection cfs``), ``--head_epochs`` of head fine-tuning at ``--head_lr``, per-image crops of ``--shift`` px
(no flip: letters); the reference ResNet path's loss weights and inversion budget (50 steps per block,
160 refinement steps). Task 0 is trained once per seed and loaded by the other methods (`shared_first_task`).
Methods: ``finetune``, ``lwf``, ``pmi``, ``full_inversion`` (random start, the same passes),
``exemplar_replay`` (real images, not data-free) with ``--replay_per_class`` samples per class, and
``joint`` (`finetune` on one task of all 20 letters, the same first-task epochs: the upper bound).

Each run is one process (one torch thread), ``--jobs`` at a time; finished runs under ``--workdir``
are reused when their settings match, and runs of other invocations with the same settings already in
``--output`` are kept. Writes ``{"runs": [{"method", "seed", "a_last", "a_avg", "inversion_seconds", ...}],
"summary": {method: mean / sample std}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("finetune", "lwf", "pmi", "full_inversion", "exemplar_replay", "joint")
NUM_CLASSES, NUM_TASKS, IMAGE_SIZE, TEST_PER_CLASS, DATA_SEED = 20, 5, 16, 50, 1234
# The remaining deviations' flags (ResNetContinualConfig; docs/resnet.md) and hf_pmi's defaults: rows written
# before these flags existed ran with the defaults.
VARIANTS = {"crop_fill": "mean", "last_stage": "block", "loss_form": "sum", "target_classes": "equal", "head_counts": "fixed"}


def row_settings(row: dict) -> dict:
    return {**VARIANTS, **row.get("settings", {})}


def fonts_tasks(seed: int, settings: dict, joint: bool = False):
    """The fonts world's tasks for `seed` (class order shuffled by the seed; see the module docstring) and
    the order (``order[j]``: the letter that becomes class j)."""
    import torch

    from hf_pmi.resnet.continual import TensorTask
    from hf_pmi.testing.fonts import font_letters_images

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(NUM_CLASSES, generator=g).tolist()
    remap = torch.empty(NUM_CLASSES, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(NUM_CLASSES)

    def tensors(per_class, data_seed):
        images, labels = font_letters_images(per_class, NUM_CLASSES, IMAGE_SIZE, data_seed)
        return torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0, remap[torch.tensor(labels)]

    x, y = tensors(settings["train_per_class"], DATA_SEED)
    xt, yt = tensors(TEST_PER_CLASS, DATA_SEED + 1)
    per_task = NUM_CLASSES // NUM_TASKS
    first = y < per_task
    mean, std = x[first].mean(dim=(0, 2, 3)).view(1, 3, 1, 1), x[first].std(dim=(0, 2, 3)).view(1, 3, 1, 1)
    x, xt = (x - mean) / std, (xt - mean) / std
    splits = [list(range(k, k + per_task)) for k in range(0, NUM_CLASSES, per_task)]
    if joint:
        splits = [list(range(NUM_CLASSES))]
    tasks = []
    for ids in splits:
        m, mt = (y >= ids[0]) & (y <= ids[-1]), (yt >= ids[0]) & (yt <= ids[-1])
        tasks.append(TensorTask(ids, x[m], y[m], xt[mt], yt[mt]))
    return tasks, order, (mean.flatten().tolist(), std.flatten().tolist())


def run_one(method: str, seed: int, settings: dict) -> dict:
    """One run in this process; returns its row."""
    import torch
    from transformers import TrainingArguments

    from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    from hf_pmi.resnet.continual import ResNetContinualConfig, black_fill, learn_tasks
    from hf_pmi.testing.fonts import LETTERS

    torch.set_num_threads(1)
    tasks, order, (mean, std) = fonts_tasks(seed, settings, joint=method == "joint")
    torch.manual_seed(seed)
    model = ResNet32ForImageClassification(ResNet32Config(
        num_labels=0, image_size=IMAGE_SIZE, blocks_per_stage=settings["blocks_per_stage"]))
    config = ResNetContinualConfig(
        method="finetune" if method == "joint" else method, seed=seed, epochs=settings["first_epochs"],
        later_epochs=settings["later_epochs"], replay_per_class=settings["replay_per_class"],
        schedule=settings["schedule"], regenerate=bool(settings["regenerate"]), selection=settings["selection"],
        head_epochs=settings["head_epochs"], head_lr=settings["head_lr"], shift=settings["shift"],
        crop_fill=black_fill(mean, std) if settings["crop_fill"] == "black" else None,
        **{k: settings[k] for k in VARIANTS if k != "crop_fill"})
    t0 = time.perf_counter()
    with shared_first_task(Path(settings["workdir"]), seed, settings, enabled=method != "joint"):
        result = learn_tasks(model, tasks, config, args=TrainingArguments(
            output_dir=str(Path(settings["workdir"]) / "trainer"), max_grad_norm=0.0,  # the reference never clips
            gradient_accumulation_steps=1, report_to="none", disable_tqdm=True, use_cpu=True, logging_strategy="no"))
    return {
        "method": method, "seed": seed, "a_last": result["a_last"], "a_avg": result["a_avg"],
        "forgetting": result["forgetting"], "inversion_seconds": result["inversion_seconds"],
        "inversion_passes": result["inversion_passes"], "wall_seconds": time.perf_counter() - t0,
        "accuracy_matrix": result["accuracy_matrix"], "class_order": [LETTERS[i] for i in order],
        "inverted_classes": result["inverted_classes"],
        "settings": {k: v for k, v in settings.items() if k != "workdir"},
        "first_task_loaded": method != "joint" and result["task_seconds"][0] < 1.0,  # then wall_seconds lacks task 0
    }


@contextlib.contextmanager
def shared_first_task(workdir: Path, seed: int, settings: dict, enabled: bool = True):
    """Task 0 is the same for every method of a seed (same initialisation, batches and crops; no teacher, so
    plain CE): train it once, then load its weights and random state in the other methods' runs, which then
    go on exactly as if they had trained it themselves (CPU, one thread: the same operations give the same bits)."""
    import torch

    from hf_pmi.resnet.learner import Learner

    keys = ("train_per_class", "first_epochs", "blocks_per_stage", "schedule", "shift")
    tagged = {k: settings[k] for k in keys}
    if settings.get("crop_fill", VARIANTS["crop_fill"]) != VARIANTS["crop_fill"]:  # the padding shapes task 0 too (the default keeps old tags)
        tagged["crop_fill"] = settings["crop_fill"]
    tag = hashlib.sha256(json.dumps(tagged, sort_keys=True).encode()).hexdigest()[:12]
    cache = workdir / f"task0-seed{seed}-{tag}.pt"
    original = Learner.train_task

    def train_task(self, task, teacher, n_old):
        if teacher is not None:
            return original(self, task, teacher, n_old)
        if cache.exists():
            blob = torch.load(cache)
            self.model.load_state_dict(blob["model"])
            self.generator.set_state(blob["generator"])
            torch.set_rng_state(blob["torch_rng"])
            return blob["losses"]
        losses = original(self, task, teacher, n_old)
        torch.save({"model": self.model.state_dict(), "generator": self.generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "losses": losses}, cache)
        return losses

    if enabled:
        Learner.train_task = train_task
    try:
        yield
    finally:
        Learner.train_task = original


def summarise(runs: list[dict]) -> dict:
    out = {}
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        out[method] = {}
        for key in ("a_last", "a_avg", "inversion_seconds", "wall_seconds"):
            vals = [r[key] for r in rows]
            # sample standard deviation (n - 1) over seeds
            out[method][key] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        out[method]["seeds"] = [r["seed"] for r in rows]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--train_per_class", type=int, default=300)
    # from scratch on 4 letters the net needs many more epochs to leave chance than on all 20 (0.36 after 20)
    parser.add_argument("--first_epochs", type=int, default=60, help="epochs of task 0 (and of joint)")
    parser.add_argument("--later_epochs", type=int, default=20, help="epochs of tasks 1-4")
    parser.add_argument("--replay_per_class", type=int, default=20, help="kept samples per old class")
    parser.add_argument("--blocks_per_stage", type=int, default=5, help="5: ResNet-32, 3: ResNet-20")
    parser.add_argument("--schedule", default="staged", choices=("staged", "one_cycle"),
                        help="staged: the reference's later-task stages (ResNetContinualConfig.schedule)")
    parser.add_argument("--regenerate", type=int, default=1, choices=(0, 1),
                        help="1: the reference's pool, re-fitted and inverted anew after every task; 0: each class once")
    parser.add_argument("--selection", default="cfs", choices=("cfs", "gaussian"), help="inversion targets (reference: cfs)")
    # the reference's 40 head epochs at lr 0.005 per 160 later-task epochs, scaled to 20 later epochs
    parser.add_argument("--head_epochs", type=int, default=5)
    parser.add_argument("--head_lr", type=float, default=0.005)
    parser.add_argument("--shift", type=int, default=2, help="random-crop padding (px) of the 16 px letters")
    parser.add_argument("--crop_fill", default="mean", choices=("mean", "black"),
                        help="crop padding: 0 of the normalised tensor (the channel mean) or black (the reference)")
    from hf_pmi.resnet.continual import CHOICES

    for name, choices in CHOICES.items():
        parser.add_argument(f"--{name}", default=choices[0], choices=choices, help="ResNetContinualConfig." + name)
    parser.add_argument("--workdir", default="runs/continual_resnet")
    parser.add_argument("--output", default="benchmarks/results/continual_resnet.json")
    parser.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)  # internal: method seed, in a child process
    args = parser.parse_args(argv)
    settings = {k: getattr(args, k) for k in ("train_per_class", "first_epochs", "later_epochs", "replay_per_class",
                                              "blocks_per_stage", "schedule", "regenerate", "selection", "head_epochs",
                                              "head_lr", "shift", *VARIANTS)}
    workdir = Path(args.workdir)
    if args._run:
        method, seed = args._run[0], int(args._run[1])
        row = run_one(method, seed, {**settings, "workdir": str(workdir)})
        (workdir / f"{method}-{seed}.json").write_text(json.dumps(row, indent=1))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    todo, done = [], {}
    for seed in args.seeds:
        for method in args.methods:
            path = workdir / f"{method}-{seed}.json"
            if path.exists() and row_settings(json.loads(path.read_text())) == settings:
                done[(method, seed)] = json.loads(path.read_text())
            else:
                todo.append((method, seed))
    t0, running = time.perf_counter(), []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while todo or running:
        while todo and len(running) < args.jobs:
            method, seed = todo.pop(0)
            cmd = [sys.executable, __file__, "--_run", method, str(seed), "--workdir", str(workdir),
                   *[f"--{k}={v}" for k, v in settings.items()]]
            with open(workdir / f"{method}-{seed}.log", "w") as log:  # the child keeps its own handle
                running.append(((method, seed), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(2)
        for item in list(running):
            (method, seed), proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            path = workdir / f"{method}-{seed}.json"
            if proc.returncode != 0 or not path.exists():
                raise SystemExit(f"{method} seed {seed} failed (exit {proc.returncode}): see {workdir / f'{method}-{seed}.log'}")
            done[(method, seed)] = json.loads(path.read_text())
            r = done[(method, seed)]
            print(f"{method:>16} seed {seed}: A_last {r['a_last']:.3f}, A_avg {r['a_avg']:.3f}, inversion "
                  f"{r['inversion_seconds']:.0f} s, {r['wall_seconds']:.0f} s ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    runs = [done[k] for k in sorted(done, key=lambda k: (METHODS.index(k[0]), k[1]))]
    output = Path(args.output)
    previous = json.loads(output.read_text())["runs"] if output.exists() else []
    keep = [r for r in previous if (r["method"], r["seed"]) not in done and row_settings(r) == settings]
    runs = keep + runs
    command = " ".join(["OMP_NUM_THREADS=1 python", os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]])
    result = {"runs": runs, "summary": summarise(runs), "command": command, "settings": settings,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                         f"one torch thread per run, {args.jobs} runs at a time"}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    for method, s in result["summary"].items():
        print(f"{method:>16}: A_last {s['a_last']['mean']:.3f} ± {s['a_last']['std']:.3f}, A_avg {s['a_avg']['mean']:.3f}, "
              f"inversion {s['inversion_seconds']['mean']:.0f} s, wall {s['wall_seconds']['mean']:.0f} s")
    print(f"-> {output}")


if __name__ == "__main__":
    main()
