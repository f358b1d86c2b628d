"""How much cheaper is PMI than full-model inversion at reaching the same loss?

Same trained model, same targets, same objective (the full-model refinement loss: feature MSE +
alpha_rf * layer-input KL + alpha_tv * TV), same seed:

1. ``mode="full"``: refinement from a random start for ``--full_steps`` steps; its best loss is L*.
2. ``mode="pmi"``: per-layer inversion, then refinement; we record the full-model-equivalent
   passes and seconds at which its refinement loss first reaches L*.

Passes follow `hf_pmi.inversion`: one pass = forward + backward through the whole tower; a
per-layer step on block i counts ``block_costs()[i]``.

Default model: a "mini" CLIP (hidden 128, 4 layers) whose vision tower + a linear head are trained
on scikit-learn digits here (~1 min). Targets: class Gaussians of its digits features.

    python benchmarks/inversion_efficiency.py --output results/inversion_efficiency.json
    python benchmarks/inversion_efficiency.py --output vitb16_timing.json --timing_only --config vit-b16

``--timing_only --config vit-b16`` builds a random-weight ViT-B/16 CLIP vision tower from a config
(no download) and times one step of each stage, with the achieved FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_pmi.bank import FeatureBank, class_features  # noqa: E402
from hf_pmi.blocks import VisionBlocks  # noqa: E402
from hf_pmi.inversion import InversionConfig, _coarse_to_fine, _Objective, _Tracker, invert  # noqa: E402
from hf_pmi.statistics import collect_layer_statistics, eval_mode  # noqa: E402

# CLIP's image normalisation (OpenAI's statistics, what CLIPImageProcessor uses by default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def train_mini(x, y, epochs: int, seed: int):
    """Train the vision tower + visual projection of a mini CLIP with a linear head on digits."""
    from hf_pmi.testing import build_clip

    model = build_clip("mini", seed=seed)
    blocks = VisionBlocks(model)
    head = torch.nn.Linear(model.config.projection_dim, 10)
    params = list(model.vision_model.parameters()) + list(model.visual_projection.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)  # lr 1e-3: the recipe's AdamW lr
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=g)
        total, correct = 0.0, 0
        for start in range(0, len(y), 64):  # batch 64, as the recipe
            idx = order[start : start + 64]
            logits = head(blocks.features(x[idx]))
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
        print(f"  epoch {epoch + 1}: loss {total / len(y):.3f}, train accuracy {correct / len(y):.3f}", flush=True)
    return model.eval()


def first_reach(curve, level):
    for passes, seconds, loss in curve:
        if loss <= level:
            return passes, seconds
    return None, None


def run_comparison(args) -> dict:
    torch.manual_seed(args.seed)
    if args.model_name_or_path:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(args.model_name_or_path).eval()
        name = args.model_name_or_path
    else:
        name = "mini CLIP (hidden 128, 4 layers, image 32, patch 4) trained on digits"
    image_size = model.config.vision_config.image_size if args.model_name_or_path else 32
    x, y = digits_tensors(image_size)
    if not args.model_name_or_path:
        t = time.perf_counter()
        print(f"training the mini CLIP vision tower for {args.train_epochs} epochs", flush=True)
        model = train_mini(x, y, args.train_epochs, args.seed)
        print(f"  trained in {time.perf_counter() - t:.1f} s", flush=True)

    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(y), 128)]
    stats = collect_layer_statistics(model, (b for b, _ in batches))
    bank = FeatureBank()
    feats = class_features(model, batches)
    bank.add_classes(sorted(feats), feats, train_contrastive=False)
    per_class = args.batch // 10
    targets, _ = bank.sample(range(10), per_class, torch.Generator().manual_seed(args.seed), selection="gaussian")
    print(f"{targets.shape[0]} targets (class Gaussians of digits features, seed {args.seed})", flush=True)

    common = dict(batch_size=targets.shape[0], inversion_seed=args.seed)
    full_cfg = InversionConfig(mode="full", full_steps=args.full_steps, full_lr=args.full_lr, **common)
    pmi_cfg = InversionConfig(
        mode="pmi", layer_steps=args.layer_steps, first_block_steps=args.first_block_steps,
        upsample_at=tuple(int(round(args.first_block_steps * f)) for f in (0.25, 0.5, 0.75)),
        refine_steps=args.refine_steps, refine_lr=args.refine_lr, layer_init=args.layer_init, **common,
    )
    print(f"full-model inversion from a random start: {args.full_steps} steps, lr {args.full_lr}", flush=True)
    full = invert(model, targets, stats, full_cfg, progress=args.progress).report
    level = full["final_loss"]
    print(f"  L* = {level:.5f} after {full['full_model_passes']:.1f} passes, {full['seconds']:.1f} s", flush=True)
    print("PMI: per-layer inversion then refinement", flush=True)
    pmi = invert(model, targets, stats, pmi_cfg, progress=args.progress).report
    passes, seconds = first_reach(pmi["curve"], level)
    # the reverse question: when does the full run first reach PMI's final loss?
    full_passes_to_pmi, full_seconds_to_pmi = first_reach(full["curve"], pmi["final_loss"])
    print(f"  per-layer stage: {sum(v for k, v in pmi['stage_passes'].items() if k != 'refine'):.1f} passes, "
          f"{sum(v for k, v in pmi['stage_seconds'].items() if k != 'refine'):.1f} s; stage losses {pmi['stage_loss']}")
    print(f"  first refinement loss {pmi['curve'][0][2]:.5f}, final {pmi['final_loss']:.5f}", flush=True)

    result = {
        "full": {"passes": full["full_model_passes"], "seconds": full["seconds"], "final_loss": level,
                 "steps": args.full_steps, "lr": args.full_lr, "final_feature_mse": full["final_feature_mse"]},
        "pmi": {"passes_to_match": passes, "seconds_to_match": seconds, "final_loss": pmi["final_loss"],
                "total_passes": pmi["full_model_passes"], "total_seconds": pmi["seconds"],
                "final_feature_mse": pmi["final_feature_mse"], "steps": pmi["steps"],
                "stage_passes": pmi["stage_passes"], "stage_seconds": pmi["stage_seconds"], "stage_loss": pmi["stage_loss"],
                "first_refine_loss": pmi["curve"][0][2] if pmi["curve"] else None,
                "config": {k: v for k, v in pmi_cfg.to_dict().items() if k in (
                    "layer_steps", "first_block_steps", "upsample_at", "refine_steps", "refine_lr", "layer_init", "a_layer")}},
        "full_to_reach_pmi_final": {"passes": full_passes_to_pmi, "seconds": full_seconds_to_pmi},
        "passes_ratio": full["full_model_passes"] / passes if passes else None,
        "seconds_ratio": full["seconds"] / seconds if seconds else None,
        "model": name,
        "batch": targets.shape[0],
        "machine": machine(),
        "seed": args.seed,
        "objective": "feature MSE + alpha_rf * sum_k KL(layer k input) + alpha_tv * TV (hf_pmi.inversion.full_loss)",
        "note": "ratios are full budget / PMI cost to first reach the full run's best loss; null if PMI never reached it",
    }
    plot(full["curve"], pmi["curve"], level, Path(args.output).with_suffix(".png"))
    return result


def plot(full_curve, pmi_curve, level, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c[0] for c in full_curve], [c[2] for c in full_curve], label="full-model inversion (random start)")
    ax.plot([c[0] for c in pmi_curve], [c[2] for c in pmi_curve], label="PMI refinement (after per-layer stage)")
    ax.axhline(level, color="gray", ls="--", lw=1, label="L* (full run's best)")
    ax.set_xlabel("full-model-equivalent passes")
    ax.set_ylabel("full-model loss")
    ax.set_yscale("log")
    ax.legend()
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
    obj = _Objective(blocks, stats, cfg, torch.device("cpu"), torch.float32)
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
        c2f_cfg = InversionConfig(first_block_steps=steps, upsample_at=(2, 4, 6), batch_size=b)
        tr = _Tracker(steps, False, "")
        t = time.perf_counter()
        _coarse_to_fine(obj, target2, b, gen, c2f_cfg, tr)
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
    parser.add_argument("--output", required=True, help="JSON file to write (the plot goes next to it as .png)")
    parser.add_argument("--model_name_or_path", default=None, help="a CLIPModel directory or Hub id (default: train a mini CLIP)")
    parser.add_argument("--timing_only", action="store_true", help="only time one step of each stage")
    parser.add_argument("--config", default="vit-b16", help="architecture for --timing_only")
    parser.add_argument("--batch", type=int, default=20, help="targets (reference refinement batch 20); 8 for --timing_only")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per stage (--timing_only)")
    parser.add_argument("--train_epochs", type=int, default=3, help="epochs of mini-CLIP training (~0.7 accuracy at 3)")
    parser.add_argument("--full_steps", type=int, default=1500, help="budget N of the random-start baseline")
    parser.add_argument("--full_lr", type=float, default=0.03, help="Adam lr of the baseline (cosine; 0.03 beat 0.1)")
    parser.add_argument("--layer_steps", type=int, default=200, help="PMI steps per block (reference 200)")
    parser.add_argument("--first_block_steps", type=int, default=1200, help="coarse-to-fine steps of block 1 (reference 1200)")
    parser.add_argument("--refine_steps", type=int, default=600, help="PMI refinement steps (reference 600)")
    parser.add_argument("--refine_lr", type=float, default=0.01, help="PMI refinement lr (reference 0.01)")
    parser.add_argument("--layer_init", default=InversionConfig.layer_init, choices=("noise", "forward", "target"),
                        help="start of each block in the per-layer stage (see InversionConfig.layer_init; 'noise' = reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--progress", action="store_true", help="tqdm bars")
    args = parser.parse_args(argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timing_only and args.batch == 20:
        args.batch = 8  # the batch of environment.md's ViT-B/16 timings
    result = run_timing(args) if args.timing_only else run_comparison(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "block_costs"}, indent=2))


if __name__ == "__main__":
    main()
