"""Analytic heads on a ResNet's penultimate features, ACIL's setting (issue 32 part 5), in the fonts world.

    OMP_NUM_THREADS=1 python benchmarks/resnet_heads.py --seeds 0 1 2 --blocks_per_stage 3 \
        --workdir runs/continual_resnet30      # -> benchmarks/results/resnet_heads.json (docs/resnet.md)

The world, the class orders, the network and the first task are those of `benchmarks/continual_resnet.py`
(20 letters, 5 tasks of 4, a ResNet-20 from scratch, 60 epochs of SGD on the first task; with the same
``--workdir`` the first task trained there for a seed is loaded, so every row of a seed shares it). Then the
network is frozen and each task's letters join a statistic head on the penultimate features
(`hf_pmi.resnet.analytic.learn_analytic`): ``acil_ranpac`` (ridge on a 2,000-dim random ReLU expansion, the
ridge chosen on the hold-out of every seen class) and ``acil_ncm`` (nearest class mean). No replay, no
gradient after the first task. Writes ``{"runs": [{"method", "seed", "a_last", "a_avg", "forgetting",
"accuracy_matrix", "wall_seconds"}], "summary", "command", "machine"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from continual_resnet import fonts_tasks, shared_first_task  # noqa: E402

HEADS = ("ranpac", "ncm")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_per_class", type=int, default=300)
    parser.add_argument("--first_epochs", type=int, default=60)
    parser.add_argument("--blocks_per_stage", type=int, default=5)
    parser.add_argument("--schedule", default="staged", choices=("staged", "one_cycle"))
    parser.add_argument("--shift", type=int, default=2)
    parser.add_argument("--workdir", default="runs/continual_resnet")
    parser.add_argument("--output", default="benchmarks/results/resnet_heads.json")
    args = parser.parse_args(argv)

    import torch

    from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    from hf_pmi.resnet.analytic import learn_analytic
    from hf_pmi.resnet.continual import ResNetContinualConfig

    torch.set_num_threads(1)
    settings = {k: getattr(args, k) for k in ("train_per_class", "first_epochs", "blocks_per_stage", "schedule", "shift")}
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        tasks, *_ = fonts_tasks(seed, settings)
        torch.manual_seed(seed)  # as continual_resnet.run_one: the same initialisation
        model = ResNet32ForImageClassification(ResNet32Config(num_labels=0, image_size=16,
                                                              blocks_per_stage=args.blocks_per_stage))
        config = ResNetContinualConfig(method="finetune", seed=seed, epochs=args.first_epochs, schedule=args.schedule,
                                       shift=args.shift, progress=False)
        for head in HEADS:
            t0 = time.perf_counter()
            with shared_first_task(Path(args.workdir), seed, settings):
                result = learn_analytic(model, tasks, config, head=head, seed=seed)
            rows.append({"method": f"acil_{head}", "seed": seed, "a_last": result["a_last"], "a_avg": result["a_avg"],
                         "forgetting": result["forgetting"], "accuracy_matrix": result["accuracy_matrix"],
                         "wall_seconds": time.perf_counter() - t0})
            print(f"acil_{head} seed {seed}: A_last {result['a_last']:.3f}", flush=True)
    summary = {}
    for method in sorted({r["method"] for r in rows}):
        vals = [r["a_last"] for r in rows if r["method"] == method]
        summary[method] = {"a_last": {"mean": statistics.mean(vals),
                                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0},  # sample std
                           "seeds": [r["seed"] for r in rows if r["method"] == method]}
    doc = {"runs": rows, "summary": summary, "settings": settings, "command": " ".join(["python", *sys.argv]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, one torch thread"}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
