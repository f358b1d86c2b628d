"""Is PMI cheaper than a random start at reaching the same inversion loss? (issue 9's fair ratio)

Same trained model, same targets, same objective (the full-model refinement loss: feature MSE +
alpha_rf * layer-input KL + alpha_tv * TV), same seed. For each run under test (`pmi` = hf_pmi's
default settings, ``reference`` = ``InversionConfig(preset="reference")``):

1. the run: per-layer stage, then refinement; it costs P passes and S seconds and ends at loss L;
2. a random start with the refinement's own settings (objective, lr, schedule shape: the cosine
   period scaled with the budget) and a budget of ``--random_budget`` (default 5) x P passes;
3. ``passes_ratio`` = passes the random start needs to first reach L / P, ``seconds_ratio`` the
   same in seconds. If the random start never reaches L, the ratios are budget / P (and seconds
   likewise) and ``lower_bound`` is true.

Per-layer diagnostics per block (stage loss, mean variance of the solved input against the real
one, by the stored statistics) and the refinement's start loss, with the passes a random start
needs to reach that start loss (``per_layer_ratio``: those passes / the per-layer stage's).

Passes follow `hf_pmi.inversion`: one pass = forward + backward through the whole tower; a
per-layer step on block i counts ``block_costs()[i]``.

Default model: the "small" letters CLIP of `hf_pmi.testing` (hidden 48, 8 layers, patch 4: a square
patch embedding, 3 x 4 x 4 = 48 -> 48, as ViT-B/16's 768 -> 768), pre-trained offline and cached.
Targets: class Gaussians of its features of scikit-learn's digits.

    python benchmarks/inversion_efficiency.py                          # -> benchmarks/results/inversion_efficiency.json
    python benchmarks/inversion_efficiency.py --output vitb16_timing.json --timing_only --config vit-b16

``--timing_only --config vit-b16`` builds a random-weight ViT-B/16 CLIP vision tower from a config
(no download) and times one step of each stage, with the achieved FLOP/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_pmi.bank import FeatureBank, class_features  # noqa: E402
from hf_pmi.blocks import VisionBlocks  # noqa: E402
from hf_pmi.inversion import InversionConfig, Objective, invert  # noqa: E402
from hf_pmi.inversion.objective import CLIP_MEAN, CLIP_STD, upsample  # noqa: E402
from hf_pmi.inversion.optim import Tracker, coarse_to_fine  # noqa: E402
from hf_pmi.statistics import collect_layer_statistics, eval_mode  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def digits_tensors(image_size: int):
    from hf_pmi.testing import digits_images

    images, labels = digits_images(image_size)
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return x, torch.tensor(labels)


def load_model(args):
    if args.model.startswith("letters-"):
        from hf_pmi.testing import letters_clip

        size = args.model.split("-", 1)[1]
        t = time.perf_counter()
        model = letters_clip(size, seed=args.backbone_seed)
        print(f"{args.model} backbone (seed {args.backbone_seed}) ready in {time.perf_counter() - t:.1f} s", flush=True)
        return model.eval(), f"{size} letters CLIP (hf_pmi.testing.backbones.letters_clip, seed {args.backbone_seed})"
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(args.model).eval(), args.model


def first_reach(curve, level):
    for passes, seconds, loss in curve:
        if loss <= level:
            return passes, seconds
    return None, None


def loss_at(curve, passes):
    """The loss of the last step within `passes` (None before the first step)."""
    done = [loss for p, _, loss in curve if p <= passes + 1e-9]
    return done[-1] if done else None


def random_twin(config: InversionConfig, budget_passes: float, cost: float) -> InversionConfig:
    """A random start with the refinement's settings of `config` and a budget in passes."""
    steps = max(1, math.ceil(budget_passes / cost))
    period = (config.refine_t_max or config.refine_steps) / max(1, config.refine_steps)  # schedule shape
    return dataclasses.replace(config, preset="", full_space="patch", full_steps=steps,
                               full_lr=config.refine_lr, full_t_max=max(1, round(period * steps)))


def compare(name, config, model, targets, stats, args) -> dict:
    blocks = VisionBlocks(model)
    cost = sum(blocks.block_costs()[config.start_block:])
    print(f"[{name}] per-layer stage + refinement", flush=True)
    run = invert(model, targets, stats, config, progress=args.progress).report
    P, S, L = run["full_model_passes"], run["seconds"], run["final_loss"]
    refine_passes = run["stage_passes"].get("refine", 0.0)
    per_layer_passes = P - refine_passes
    per_layer_seconds = S - run["stage_seconds"].get("refine", 0.0)
    print(f"  {P:.1f} passes, {S:.1f} s, final loss {L:.5f}; refinement start {run.get('start_loss', float('nan')):.5f} "
          f"after {per_layer_passes:.1f} per-layer passes", flush=True)
    twin = random_twin(config, args.random_budget * P, cost)
    print(f"[{name}] random start, same settings, {twin.full_steps} steps (lr {twin.full_lr}, cosine period "
          f"{twin.full_t_max})", flush=True)
    rnd = invert(model, targets, stats, twin, mode="full", progress=args.progress).report
    passes, seconds = first_reach(rnd["curve"], L)
    lower = passes is None
    start_passes, _ = first_reach(rnd["curve"], run.get("start_loss", -math.inf))
    result = {
        "passes_ratio": (rnd["full_model_passes"] if lower else passes) / P,
        "seconds_ratio": (rnd["seconds"] if lower else seconds) / S,
        "lower_bound": lower,
        "passes": P, "seconds": S, "final_loss": L, "final_feature_mse": run["final_feature_mse"],
        "random_start": {
            "budget_passes": rnd["full_model_passes"], "seconds": rnd["seconds"], "steps": twin.full_steps,
            "final_loss": rnd["final_loss"], "passes_to_match": passes, "seconds_to_match": seconds,
            "loss_at_matched_passes": loss_at(rnd["curve"], P),
            "passes_to_reach_refinement_start": start_passes,
        },
        "per_layer": {
            "passes": per_layer_passes, "seconds": per_layer_seconds,
            "refinement_start_loss": run.get("start_loss"),
            "per_layer_ratio": None if start_passes is None or per_layer_passes == 0 else start_passes / per_layer_passes,
            "stage_loss": run["stage_loss"], "block_variance": run["block_variance"],
            "stage_passes": run["stage_passes"], "stage_seconds": run["stage_seconds"], "steps": run["steps"],
        },
        "config": {k: v for k, v in config.to_dict().items() if k not in ("per_class", "selection", "boost", "cfs_batch",
                                                                         "rho", "tau", "exact_standardise")},
    }
    verdict = ("never reached by the random start: ratio is a lower bound" if lower
               else f"random start reaches it after {passes:.1f} passes")
    print(f"  passes_ratio {result['passes_ratio']:.2f} ({verdict}); random start at the run's {P:.0f} passes: "
          f"{result['random_start']['loss_at_matched_passes']}", flush=True)
    return result, run["curve"], rnd["curve"]


def run_comparison(args) -> dict:
    torch.manual_seed(args.seed)
    model, name = load_model(args)
    x, y = digits_tensors(model.config.vision_config.image_size)
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(y), 128)]
    stats = collect_layer_statistics(model, (b for b, _ in batches))
    bank = FeatureBank()
    feats = class_features(model, batches)
    bank.add_classes(sorted(feats), feats, train_contrastive=False)
    targets, _ = bank.sample(range(10), args.targets // 10, torch.Generator().manual_seed(args.seed), selection="gaussian")
    print(f"{targets.shape[0]} targets (class Gaussians of digits features, seed {args.seed})", flush=True)

    common = dict(batch_size=targets.shape[0], seed=args.seed)
    runs = {"pmi": InversionConfig(**common), "reference": InversionConfig(preset="reference", **common)}
    results, curves = {}, {}
    for key in args.runs:
        results[key], run_curve, rnd_curve = compare(key, runs[key], model, targets, stats, args)
        curves[key] = (run_curve, rnd_curve, results[key]["final_loss"])
    out = dict(results.get("pmi", {}))
    if "reference" in results:
        out["reference"] = results["reference"]
    out.update({
        "model": name, "targets": targets.shape[0], "random_budget": args.random_budget, "machine": machine(),
        "seed": args.seed,
        "objective": "feature MSE + alpha_rf * sum_k KL(layer k input) + alpha_tv * TV (hf_pmi.inversion.full_loss)",
        "note": "passes_ratio = passes a random start with the refinement's settings needs to reach the run's final loss "
                "/ the run's passes; lower_bound: the random start never reached it within random_budget x the run's "
                "passes, and the ratio is budget / passes",
    })
    plot(curves, Path(args.output).with_suffix(".png"))
    return out


def plot(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (key, (run_curve, rnd_curve, level)) in zip(axes[0], curves.items()):
        ax.plot([c[0] for c in rnd_curve], [c[2] for c in rnd_curve], label="random start (refinement settings)")
        ax.plot([c[0] for c in run_curve], [c[2] for c in run_curve], label=f"{key}: refinement after the per-layer stage")
        ax.axhline(level, color="gray", ls="--", lw=1, label=f"{key}'s final loss")
        ax.set_xlabel("full-model-equivalent passes")
        ax.set_ylabel("full-model loss")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# ----- timing only ------------------------------------------------------------------------------
def vit_b16():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(  # openai/clip-vit-base-patch16's vision tower
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=16, projection_dim=512,
    )
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(config).eval()


def forward_macs(blocks: VisionBlocks) -> list[float]:
    """Multiply-adds of each block's forward (the formula behind `VisionBlocks.block_costs`)."""
    d, n, g = blocks.hidden_size, blocks.num_tokens, blocks.grid
    conv = blocks.embeddings.patch_embedding
    inter = blocks.layers[0].mlp.fc1.out_features
    layer = n * (4 * d * d + 2 * d * inter) + 2 * n * n * d
    return [conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * d * g * g, n * d * 4] + [layer] * blocks.num_layers + [
        d * blocks.visual_projection.out_features + d * 4
    ]


def time_steps(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def run_timing(args) -> dict:
    if args.config != "vit-b16":
        raise SystemExit(f"--config {args.config!r} is not known; use vit-b16.")
    model = vit_b16()
    blocks = VisionBlocks(model)
    stats = collect_layer_statistics(model, [torch.randn(4, 3, 224, 224)])
    cfg = InversionConfig(batch_size=args.batch)
    obj = Objective(blocks, stats, cfg, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    b = args.batch
    macs = forward_macs(blocks)
    out = {}
    with eval_mode(model), torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)
        z2 = obj.sample_input(2, b, gen).requires_grad_(True)
        target3 = obj.sample_input(3, b, gen)
        layer_step = time_steps(lambda: torch.autograd.grad(obj.block_loss(2, z2, target3), z2), args.reps)
        x1 = obj.sample_input(1, b, gen).requires_grad_(True)
        target = torch.randn(b, blocks.visual_projection.out_features)
        full_step = time_steps(lambda: torch.autograd.grad(obj.full_loss(1, x1, target), x1), args.reps)
        target2 = obj.sample_input(2, b, gen)
        steps = 8
        tr = Tracker(steps, False, "")
        g = blocks.grid
        t = time.perf_counter()
        coarse_to_fine(lambda v: obj.block_loss(1, upsample(v, g), target2, coarse=v), obj.sample_input(1, b, gen, size=2),
                        g, steps, (2, 4, 6), 0.1, tr, "block1", 0.0, True)
        first_block = (time.perf_counter() - t) / steps
    # fwd + input-gradient backward ~ 2 x forward FLOPs (frozen weights: no weight gradients)
    layer_flops = 2 * 2 * macs[2] * b
    full_flops = 2 * 2 * sum(macs[1:]) * b
    out = {
        "config": "vit-b16 (random weights, hidden 768, 12 layers, image 224, patch 16)",
        "batch": b,
        "machine": machine(),
        "seconds_per_step": {"layer": layer_step, "first_block_coarse_to_fine": first_block, "full_model": full_step},
        "flops_per_step": {"layer": layer_flops, "full_model": full_flops},
        "achieved_gflops": {"layer": layer_flops / layer_step / 1e9, "full_model": full_flops / full_step / 1e9},
        "full_over_layer_time": full_step / layer_step,
        "block_costs": blocks.block_costs(),
        "note": "FLOPs = 2 x forward multiply-adds x 2 (forward + backward to the input only); KL/TV/LN not counted",
    }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/results/inversion_efficiency.json",
                        help="JSON file to write (the plot goes next to it as .png)")
    parser.add_argument("--model", default="letters-small",
                        help="'letters-small' / 'letters-mini' (offline pre-trained, cached) or a CLIPModel folder / Hub id")
    parser.add_argument("--backbone_seed", type=int, default=0, help="seed of the letters backbone's pre-training")
    parser.add_argument("--runs", nargs="+", default=["pmi", "reference"], choices=("pmi", "reference"))
    parser.add_argument("--targets", type=int, default=20, help="targets, 10 classes x targets/10 (reference refinement batch 20)")
    parser.add_argument("--random_budget", type=float, default=5.0, help="random start budget, x the run's passes (>= 5)")
    parser.add_argument("--timing_only", action="store_true", help="only time one step of each stage")
    parser.add_argument("--config", default="vit-b16", help="architecture for --timing_only")
    parser.add_argument("--batch", type=int, default=8, help="batch of --timing_only (environment.md's ViT-B/16 timings)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per stage (--timing_only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--progress", action="store_true", help="tqdm bars")
    args = parser.parse_args(argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_timing(args) if args.timing_only else run_comparison(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "block_costs"}, indent=2))


if __name__ == "__main__":
    main()
