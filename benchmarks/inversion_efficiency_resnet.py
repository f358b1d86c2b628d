"""Does the per-layer chain pay for itself on a BatchNorm network? (the ResNet counterpart of
`benchmarks/inversion_efficiency.py`)

    OMP_NUM_THREADS=1 python benchmarks/inversion_efficiency_resnet.py   # -> benchmarks/results/inversion_efficiency_resnet.json

Model: a ResNet-32 (`hf_pmi.resnet`, 16 px input) trained from scratch on the fonts world
(`hf_pmi.testing.fonts`, the arrays behind `load_font_letters_dataset`: 20 letters, 300 train images
each, test images of another seed), cached under ``runs/inversion_efficiency_resnet/<key of its
settings>``. Targets: ``--per_class`` pooled features per class drawn from the class Gaussians
(diagonal, `FeatureBank`, `replay_targets`) of its training features, seed 0. For each inversion
seed and each chain (``blocks``: the reference's 16-link chain; ``stages``: stem + 3 stages, 4 links),
`invert_bn(mode="pmi")` with the reference's settings (50 steps per link, 160 refinement steps) is
compared with random starts (`mode="full"`, N(0, 1) pixels, the refinement's objective, lr and
schedule shape, the same seed):

- ``random_5x``: ``--random_budget`` (5) x the run's passes; its loss curve gives
  ``passes_to_match`` (first pass at which it reaches the run's final loss), ``passes_ratio`` =
  passes_to_match / the run's passes (> 1: the chain pays for itself; if never reached, the budget
  over the run's passes and ``lower_bound`` true), ``per_layer_ratio`` = passes it needs to reach the
  refinement's start loss / the chain's passes, and ``loss_at_equal_passes`` (the best loss of its
  curve up to the run's passes: its schedule is stretched 5x, so its lr is still high there);
- ``random_equal``: the run's passes with its own schedule (the fair equal-budget end point);
- ``random_own``: ``--own_schedule`` (1.5) x the run's passes with its own schedule: the 5x curve
  decays its lr late, so its passes_to_match overstates what a random start needs; this bounds it.

Both chains spend the same passes (50 per link x link costs summing to one pass, + 160), so the
random starts of a seed are identical for the two chains and are run once.
Per run also: seconds, the refinement's start loss and feature MSE, final loss (refinement
objective: feature MSE + 0.25 x sum of BN KL terms, un-boosted), final feature MSE (``final_kl_term``
= final loss - final feature MSE, the weighted BN KL part), and per chain
link (`invert_bn`'s report) its loss, MSE, BN KL, ``forward_feature_mse`` (the link's solution run
through the real network) and the mean channel variance of its solved input against the
reference's prior (beta, gamma^2 below) and real inputs. ``summary`` holds mean +- std over seeds.
A pass is forward + backward of the whole network; a chain step on a link counts the link's share.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_pmi.bank import FeatureBank
from hf_pmi.resnet import (
    ResNet32Config,
    ResNet32ForImageClassification,
    collect_block_statistics,
)
from hf_pmi.resnet.inversion import BNInversionConfig, invert_bn, replay_targets
from hf_pmi.testing.fonts import font_letters_images

# Training recipe of the fonts docstring (0.98 test accuracy after 20 epochs at 16 px): 16 px keeps a
# pass at ~1/4 of CIFAR's 32 px cost; SGD momentum 0.9, one-cycle to lr 0.1, weight decay 5e-4
# (CIFAR ResNet practice), shifts of up to 2 px. The net sits at chance for ~5 epochs, so 20 epochs.
TRAIN = {"num_classes": 20, "train_per_class": 300, "test_per_class": 50, "image_size": 16, "data_seed": 1234,
         "epochs": 20, "batch": 128, "max_lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "shift": 2, "seed": 0}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def fonts_tensors(per_class: int, seed: int, s: dict, norm=None):
    images, labels = font_letters_images(per_class, s["num_classes"], s["image_size"], seed)
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0
    if norm is None:  # per-channel moments of the training images: normalised pixels, as the N(0, 1) start assumes
        norm = (x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)))
    return (x - norm[0].view(1, 3, 1, 1)) / norm[1].view(1, 3, 1, 1), torch.tensor(labels), norm


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return sum((model(pixel_values=xb).logits.argmax(-1) == yb).sum().item()
                   for xb, yb in zip(x.split(500), y.split(500))) / len(y)


def trained_model(cache_root: Path):
    """Train the ResNet-32 (or load it from the cache keyed by `TRAIN`); returns model, train data, info."""
    key = hashlib.sha1(json.dumps(TRAIN, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_root / f"resnet32-fonts-{key}"
    x, y, norm = fonts_tensors(TRAIN["train_per_class"], TRAIN["data_seed"], TRAIN)
    if (folder / "train_info.json").exists():
        info = json.loads((folder / "train_info.json").read_text())
        model = ResNet32ForImageClassification.from_pretrained(folder).eval()
        print(f"model loaded from {folder} (test accuracy {info['test_accuracy']:.3f})", flush=True)
        return model, x, y, info
    xt, yt, _ = fonts_tensors(TRAIN["test_per_class"], TRAIN["data_seed"] + 1, TRAIN, norm)
    torch.manual_seed(TRAIN["seed"])
    model = ResNet32ForImageClassification(ResNet32Config(num_labels=TRAIN["num_classes"], image_size=TRAIN["image_size"]))
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN["max_lr"], momentum=TRAIN["momentum"],
                          weight_decay=TRAIN["weight_decay"], nesterov=True)
    steps = math.ceil(len(y) / TRAIN["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, TRAIN["max_lr"], epochs=TRAIN["epochs"], steps_per_epoch=steps)
    t0, s, pad = time.perf_counter(), TRAIN["image_size"], TRAIN["shift"]
    for epoch in range(TRAIN["epochs"]):
        model.train()
        for idx in torch.randperm(len(y)).split(TRAIN["batch"]):
            dx, dy = torch.randint(0, 2 * pad + 1, (2,)).tolist()  # one random shift per batch
            xb = F.pad(x[idx], (pad,) * 4, mode="replicate")[:, :, dy:dy + s, dx:dx + s]
            loss = model(pixel_values=xb, labels=y[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    info = {"settings": TRAIN, "test_accuracy": accuracy(model, xt, yt), "train_accuracy": accuracy(model, x, y),
            "chance": 1 / TRAIN["num_classes"], "train_seconds": time.perf_counter() - t0, "machine": machine()}
    print(f"trained in {info['train_seconds']:.0f} s: test accuracy {info['test_accuracy']:.3f}", flush=True)
    model.save_pretrained(folder)
    (folder / "train_info.json").write_text(json.dumps(info, indent=2))
    return model, x, y, info


def first_reach(curve, level):
    return next(((p, s) for p, s, loss in curve if loss <= level), (None, None))


def loss_at(curve, passes):
    """Best loss within `passes` (what the random start, keeping its best iterate, would return there)."""
    done = [loss for p, _, loss in curve if p <= passes + 1e-6]
    return min(done) if done else None


def end_point(r: dict) -> dict:
    return {"passes": r["full_model_passes"], "seconds": r["seconds"], "final_loss": r["final_loss"],
            "final_feature_mse": r["final_feature_mse"], "final_kl_term": r["final_loss"] - r["final_feature_mse"]}


def compare(run: dict, rnd: dict, equal: dict, own: dict) -> dict:
    P, S, L = run["full_model_passes"], run["seconds"], run["final_loss"]
    chain_passes = P - run["stage_passes"]["refine"]
    chain_seconds = S - run["stage_seconds"]["refine"]
    passes, seconds = first_reach(rnd["curve"], L)
    lower = passes is None
    start_passes, _ = first_reach(rnd["curve"], run["start_loss"])
    return {
        "passes": P, "chain_passes": chain_passes, "refine_passes": run["stage_passes"]["refine"],
        "seconds": S, "chain_seconds": chain_seconds,
        "start_loss": run["start_loss"], "start_feature_mse": run["start_feature_mse"],
        "final_loss": L, "final_feature_mse": run["final_feature_mse"], "final_kl_term": L - run["final_feature_mse"],
        "passes_to_match": passes, "seconds_to_match": seconds, "lower_bound": lower,
        "passes_ratio": (rnd["full_model_passes"] if lower else passes) / P,
        "seconds_ratio": (rnd["seconds"] if lower else seconds) / S,
        "passes_to_reach_start": start_passes,
        "per_layer_ratio": None if start_passes is None else start_passes / chain_passes,
        "random_5x": {**end_point(rnd), "loss_at_equal_passes": loss_at(rnd["curve"], P),
                      "start_loss": rnd["curve"][0][2]},  # the N(0, 1) pixels' loss
        "random_equal": end_point(equal),
        "random_own": {**end_point(own), "reaches_run": own["final_loss"] <= L},
        "block_loss": run["block_loss"], "block_variance": run["block_variance"],
    }


def summarise(rows: list[dict]) -> dict:
    keys = {"passes": ("passes",), "chain_passes": ("chain_passes",), "seconds": ("seconds",),
            "start_loss": ("start_loss",), "final_loss": ("final_loss",), "final_feature_mse": ("final_feature_mse",),
            "final_kl_term": ("final_kl_term",), "random_start_loss": ("random_5x", "start_loss"),
            "passes_to_match": ("passes_to_match",), "passes_ratio": ("passes_ratio",),
            "per_layer_ratio": ("per_layer_ratio",), "passes_to_reach_start": ("passes_to_reach_start",),
            "random_loss_at_equal_passes": ("random_5x", "loss_at_equal_passes"),
            "random_equal_final_loss": ("random_equal", "final_loss"),
            "random_equal_final_feature_mse": ("random_equal", "final_feature_mse"),
            "random_equal_final_kl_term": ("random_equal", "final_kl_term"),
            "random_own_final_loss": ("random_own", "final_loss"),
            "random_5x_final_loss": ("random_5x", "final_loss")}
    out = {}
    for name, path in keys.items():
        vals = []
        for r in rows:
            v = r
            for k in path:
                v = v[k]
            vals.append(v)
        vals = [v for v in vals if v is not None]
        out[name] = {"mean": statistics.fmean(vals) if vals else None,
                     "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    out["any_lower_bound"] = any(r["lower_bound"] for r in rows)
    blocks = rows[0]["block_loss"].keys()  # per link, mean over seeds
    out["block_loss"] = {b: statistics.fmean(r["block_loss"][b]["loss"] for r in rows) for b in blocks}
    out["block_forward_feature_mse"] = {b: statistics.fmean(r["block_loss"][b]["forward_feature_mse"] for r in rows)
                                        for b in blocks}
    out["block_variance"] = {b: {k: (None if rows[0]["block_variance"][b][k] is None else
                                     statistics.fmean(r["block_variance"][b][k] for r in rows))
                                 for k in rows[0]["block_variance"][b]} for b in blocks}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/results/inversion_efficiency_resnet.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="inversion seeds (random starts)")
    # 2 per class x 20 classes = 40 targets, inverted as one batch: ~0.07 s per pass on one CPU thread, so
    # the default run (3 seeds x ~2000 passes) takes ~8 min after ~3 min of training (then cached); the
    # reference inverts 4000 at once
    parser.add_argument("--per_class", type=int, default=2, help="targets per class (BN moments are over the batch)")
    parser.add_argument("--target_seed", type=int, default=0, help="seed of the targets' draw")
    parser.add_argument("--chains", nargs="+", default=["blocks", "stages"], choices=("blocks", "stages"))
    parser.add_argument("--input_prior", default="bn", choices=("bn", "recorded", "none"),
                        help="the chain's prior of a block's input (BNInversionConfig.input_prior; reference: bn)")
    parser.add_argument("--a_layer", type=float, default=None, help="the chain's KL weight (None: the reference's formula)")
    parser.add_argument("--random_budget", type=float, default=5.0, help="random start budget, x the run's passes")
    parser.add_argument("--own_schedule", type=float, default=1.5,
                        help="budget (x the run's passes) of a random start with its own, unstretched schedule")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cache", default="runs/inversion_efficiency_resnet", help="folder of the trained model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, x, y, info = trained_model(Path(args.cache))
    stats, feats = collect_block_statistics(model, zip(x.split(500), y.split(500)))  # real block-input moments
    bank = FeatureBank(covariance="diag")
    bank.add_classes(sorted(feats), feats, train_contrastive=False)
    targets, _ = replay_targets(bank, sorted(feats), args.per_class, torch.Generator().manual_seed(args.target_seed),
                                     selection="gaussian")
    n = targets.shape[0]
    print(f"{n} targets ({args.per_class} per class, class Gaussians of training features)", flush=True)
    # one batch for both stages: the chain's and the refinement's BN moments are those of all targets
    base = {"layer_batch": n, "refine_batch": n}
    rows, randoms = [], {}
    for seed in args.seeds:
        for chain in args.chains:
            cfg = BNInversionConfig(mode="pmi", chain=chain, inversion_seed=seed, input_prior=args.input_prior,
                                    a_layer=args.a_layer, **base)
            run = invert_bn(model, targets, cfg, input_stats=stats).report
            print(f"[seed {seed}, {chain}] {run['full_model_passes']:.1f} passes, {run['seconds']:.0f} s: start "
                  f"{run['start_loss']:.4f}, final {run['final_loss']:.4f} (feature MSE {run['final_feature_mse']:.4f})",
                  flush=True)
            cost = run["curve"][-1][0] - run["curve"][-2][0]  # a full step's passes
            steps_5x = math.ceil(args.random_budget * run["full_model_passes"] / cost - 1e-6)
            steps_eq = round(run["full_model_passes"] / cost)
            steps_own = round(args.own_schedule * run["full_model_passes"] / cost)
            for steps in (steps_5x, steps_eq, steps_own):  # shared by the chains when their passes agree (they do)
                if (seed, steps) not in randoms:
                    rcfg = BNInversionConfig(mode="full", full_steps=steps, inversion_seed=seed, **base)
                    randoms[seed, steps] = invert_bn(model, targets, rcfg, input_stats=stats).report
                    print(f"  random start, {steps} steps: final {randoms[seed, steps]['final_loss']:.4f}, "
                          f"{randoms[seed, steps]['seconds']:.0f} s", flush=True)
            row = {"seed": seed, "chain": chain,
                   **compare(run, randoms[seed, steps_5x], randoms[seed, steps_eq], randoms[seed, steps_own])}
            for k, v in (("random_5x", steps_5x), ("random_equal", steps_eq), ("random_own", steps_own)):
                row[k]["steps"] = v
            print(f"  passes_ratio {row['passes_ratio']:.2f}{' (lower bound)' if row['lower_bound'] else ''}, "
                  f"per_layer_ratio {row['per_layer_ratio']:.3f}, random at equal passes: 5x schedule "
                  f"{row['random_5x']['loss_at_equal_passes']:.4f}, own schedule {row['random_equal']['final_loss']:.4f}; "
                  f"{args.own_schedule}x own schedule {row['random_own']['final_loss']:.4f}",
                  flush=True)
            rows.append(row)
    summary = {chain: summarise([r for r in rows if r["chain"] == chain]) for chain in args.chains}
    first = summary[args.chains[0]]["passes_ratio"]["mean"]
    out = {
        "passes_ratio": summary["blocks"]["passes_ratio"]["mean"] if "blocks" in summary else first,
        "passes_ratio_stages": summary.get("stages", {}).get("passes_ratio", {}).get("mean"),
        "summary": summary, "runs": rows,
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + " ".join(sys.argv),
        "machine": machine(), "model": {"architecture": "ResNet-32 (hf_pmi.resnet, 0.46 M parameters)", **info},
        "targets": {"count": n, "per_class": args.per_class, "seed": args.target_seed,
                    "source": "diagonal class Gaussians of the training images' pooled features"},
        "inversion": {k: v for k, v in BNInversionConfig(input_prior=args.input_prior, a_layer=args.a_layer, **base).to_dict().items()
                      if k not in ("mode", "chain")},  # the chain's own prior and weight, not the defaults
        "chain_prior": {"input_prior": args.input_prior, "a_layer": args.a_layer},
        "random_budget": args.random_budget, "own_schedule": args.own_schedule, "seeds": args.seeds, "total_seconds": time.perf_counter() - t_start,
        "note": "passes_ratio = passes a random start (refinement settings, random_budget x the run's passes) needs to "
                "reach the run's final loss / the run's passes; > 1: the per-layer chain pays for itself",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    for chain, s in summary.items():
        print(f"{chain}: " + ", ".join(f"{k} {v['mean']:.4g} +- {v['std']:.2g}" for k, v in s.items()
                                       if isinstance(v, dict) and "mean" in v and v["mean"] is not None), flush=True)
    print(f"wrote {args.output} ({out['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
