"""Inversion of a BatchNorm network on its BN statistics: the per-layer chain (PMI) and a random start.

Targets are pooled features ``(B, D)`` (sampled from class Gaussians, as on the reference's ResNet
path); the samples are pixels ``(B, C, H, W)`` that the network maps onto them.

``mode="pmi"``: the chain walks the blocks of `hf_pmi.resnet.blocks.BNBlocks` top-down, from the
last residual block (compared after pooling) to the stem. Block i's input z_i is optimised so that
``block_i(z_i)`` matches the solution of the block above (the targets for the top block):

    MSE(block_i(z_i), z_{i+1}) + a_layer * [ sum_{BN in block i} KL(batch moments || running moments)
                                             + KL(channel moments of z_i || prior of block i's input) ]

from a sample of that prior, with Adam (reference: 50 steps, lr 0.8, a_layer = alpha_rf x number of
chain blocks x rf_factor = 0.25 x 16 x 20 = 80 on ResNet-32). Then the whole network refines the
pixels: MSE(F(x), target) + alpha_rf * sum_{all BN} KL (reference: 160 steps, Adam lr 0.4, 5 warm-up
steps, x0.5 at 50 % and 75 % of the steps after the warm-up, alpha_rf 0.25).
``mode="full"``: the refinement alone from N(0, 1) pixels (the DeepInversion-style random start), with
the refinement's settings and, by default, as many full-model passes as "pmi" spends.

``chain="stages"`` (beyond the reference) makes the stem and each stage one link of the chain.
Measured by ``benchmarks/inversion_efficiency_resnet.py`` (docs/resnet.md: a ResNet-32 trained on
`hf_pmi.testing.fonts`, 40 targets, 3 seeds, 210 passes): the chain ends below a random start at equal
passes and has ``passes_ratio`` 1.6 against a 5x random start, but a random start with its own schedule
at 1.5x the passes ends lower; the chain's gain is in the BN statistics term, not the features. The
reference's input prior (beta, gamma^2 of the BN below) is 2-20x narrower than real block inputs,
whose shortcut it ignores; it is degenerate (variance 0) at the zero-residual initialisation.
``input_prior="recorded"`` uses the recorded real input moments instead.

"Boost" (reference): a weight doubles, up to 10x (the input term 5x), at every step where its term
is above its value at the first step. The reported loss, the best-iterate choice and the curves use
the un-boosted objective.

Pass accounting: one pass = forward + backward of blocks 0 .. feature_block; a per-layer step on block
i counts ``block_costs()[i]`` (multiply-adds), a full step the sum over the chain (the head's share is
below 0.1 %). The report holds passes, seconds, per-stage losses and per-block diagnostics (see
`invert_bn`).

Example:
    >>> import torch
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=2, image_size=8))
    >>> _ = model(pixel_values=torch.randn(16, 3, 8, 8))  # train mode: BN running moments move
    >>> cfg = BNInversionConfig(layer_steps=3, refine_steps=4)
    >>> result = invert_bn(model.eval(), torch.randn(6, 16), cfg)
    >>> tuple(result.samples.shape), len(result.report["curve"]), sorted(result.report["block_loss"])[:2]
    ((6, 3, 8, 8), 4, ['block0', 'block1'])
    >>> BNInversionConfig(mode="full").full_budget_steps(chunks=1)  # 50 per-layer passes + 160 refinement steps
    210
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..statistics import LayerStatistics, capture_activations, eval_mode
from .blocks import BNBlocks
from .statistics import bn_kl, channel_moments, kl_to_prior

# What the reference's ResNet path runs (its CIFAR-100 scripts); the defaults below are these values.
REFERENCE_RESNET = {
    "layer_steps": 50, "layer_lr": 0.8, "alpha_rf": 0.25, "rf_factor": 20.0, "layer_batch": 4000,
    "refine_steps": 160, "refine_lr": 0.4, "warmup": 5, "milestones": (0.5, 0.75), "gamma": 0.5,
    "refine_batch": 4000,  # gen_batch_size: 4000 CIFAR-100, 1000 Tiny-ImageNet
}


@dataclass
class BNInversionConfig:
    """Settings of `invert_bn`; the defaults are the reference's ResNet path (`REFERENCE_RESNET`).

    Example:
        >>> BNInversionConfig().layer_weight(16)  # ResNet-32: stem + 15 residual blocks
        80.0
    """

    mode: str = field(default="pmi", metadata={"help": "'pmi': per-layer chain then refinement; 'full': random start, refinement only."})
    # ----- per-layer chain
    layer_steps: int = field(default=50, metadata={"help": "Adam steps per block (reference 50)."})
    layer_lr: float = field(default=0.8, metadata={"help": "Adam lr of the chain, constant (reference 0.8)."})
    alpha_rf: float = field(default=0.25, metadata={"help": "Weight of the BN KL terms in the refinement (reference 0.25)."})
    rf_factor: float = field(default=20.0, metadata={"help": "The chain's KL weight is alpha_rf x chain blocks x rf_factor (reference 20)."})
    a_layer: float | None = field(default=None, metadata={"help": "Explicit KL weight of the chain (None: the reference's formula)."})
    input_prior: str = field(
        default="bn",
        metadata={"help": "Prior (start and KL term) of a block's input: 'bn' (reference: beta, gamma^2 of the last BN of "
                  "the block below), 'recorded' (per-channel moments of real block inputs, `collect_block_statistics`), "
                  "or 'none' (N(0, 1) start, no input term)."},
    )
    chain: str = field(
        default="blocks",
        metadata={"help": "Links of the chain: 'blocks' (reference: the stem and every residual block) or 'stages' "
                  "(beyond the reference: the stem and each stage as one link, so errors compound over 4 links on "
                  "ResNet-32 instead of 16; a link's step costs its blocks' share of a pass)."},
    )
    layer_batch: int = field(default=4000, metadata={"help": "Targets inverted together by the chain (reference 4000); BN moments are batch moments."})
    # ----- refinement and random start
    refine_steps: int = field(default=160, metadata={"help": "Full-model steps after the chain (reference 160)."})
    refine_lr: float = field(default=0.4, metadata={"help": "Adam lr of the refinement (reference 0.4)."})
    warmup: int = field(default=5, metadata={"help": "Linear warm-up steps of the refinement's lr (reference 5)."})
    milestones: tuple[float, ...] = field(
        default=(0.5, 0.75),
        metadata={"help": "lr x gamma once the steps after the warm-up pass these fractions of the steps (reference: 80 "
                  "and 120 of 160)."},
    )
    gamma: float = field(default=0.5, metadata={"help": "lr factor at each milestone (reference 0.5)."})
    refine_batch: int = field(default=4000, metadata={"help": "Targets refined together (reference 4000; 1000 Tiny-ImageNet)."})
    full_steps: int | None = field(
        default=None, metadata={"help": "Steps of mode 'full' (None: the passes 'pmi' spends on the same targets)."}
    )
    full_lr: float | None = field(default=None, metadata={"help": "Adam lr of mode 'full' (None: refine_lr)."})
    # ----- common
    boost: bool = field(default=True, metadata={"help": "The reference's weight doubling when a term rises above its start."})
    keep_best: bool = field(default=True, metadata={"help": "Return each stage's best iterate (reference), else its last."})
    init_std: float = field(default=1.0, metadata={"help": "Std of the N(0, std^2) pixel start (reference 1: normalised pixels)."})
    inversion_seed: int = field(default=0, metadata={"help": "Seed of the random starts."})

    def __post_init__(self):
        if self.mode not in ("pmi", "full"):
            raise ValueError(f"BNInversionConfig.mode must be 'pmi' or 'full', got {self.mode!r}.")
        if self.chain not in ("blocks", "stages"):
            raise ValueError(f"chain must be 'blocks' or 'stages', got {self.chain!r}.")
        if self.input_prior not in ("bn", "recorded", "none"):
            raise ValueError(f"input_prior must be 'bn', 'recorded' or 'none', got {self.input_prior!r}.")
        if self.layer_batch < 2 or self.refine_batch < 2:
            raise ValueError("layer_batch and refine_batch must be >= 2: BN moments are taken over the batch.")
        self.milestones = tuple(float(m) for m in self.milestones)

    def layer_weight(self, num_chain_blocks: int) -> float:
        """The chain's KL weight: ``a_layer``, or alpha_rf x chain blocks x rf_factor (reference)."""
        return float(self.a_layer) if self.a_layer is not None else self.alpha_rf * num_chain_blocks * self.rf_factor

    def full_budget_steps(self, chunks: int = 1, refine_chunks: int | None = None) -> int:
        """Full-model steps per refinement chunk that spend what "pmi" spends: the chain costs
        ``layer_steps`` passes per chain chunk, the refinement ``refine_steps`` per refinement chunk."""
        refine_chunks = chunks if refine_chunks is None else refine_chunks
        return round(self.refine_steps + self.layer_steps * chunks / refine_chunks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BNInversionResult:
    """``samples``: pixels ``(B, C, H, W)``; ``report``: see `invert_bn`."""

    samples: torch.Tensor
    report: dict[str, Any]


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def step_lr(step: int, steps: int, lr: float, warmup: int, milestones: tuple[float, ...], gamma: float) -> float:
    """The refinement's schedule: linear warm-up over `warmup` steps, then ``lr * gamma^k`` with k the
    milestones passed (a milestone f is passed when ``step - warmup >= round(f * steps)``).

    Example:
        >>> [step_lr(s, 160, 0.4, 5, (0.5, 0.75), 0.5) for s in (0, 4, 5, 84, 85, 125)]
        [0.08, 0.4, 0.4, 0.4, 0.2, 0.1]
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    passed = sum(step - warmup >= round(f * steps) for f in milestones)
    return lr * gamma**passed


class _Tracker:
    """Full-model-equivalent passes and wall time, per stage."""

    def __init__(self):
        self.passes, self.start = 0.0, time.perf_counter()
        self.stage_passes: dict[str, float] = {}
        self.stage_seconds: dict[str, float] = {}
        self.steps: dict[str, int] = {}

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def step(self, stage: str, cost: float) -> None:
        self.passes += cost
        self.stage_passes[stage] = self.stage_passes.get(stage, 0.0) + cost
        self.steps[stage] = self.steps.get(stage, 0) + 1


class _Objective:
    """Terms (feature MSE, BN KL sum, input KL) of single blocks and of the whole chain."""

    def __init__(self, blocks: BNBlocks, config: BNInversionConfig, input_stats: LayerStatistics | None, device, dtype):
        self.blocks, self.config, self.stats = blocks, config, input_stats
        self.device, self.dtype = device, dtype
        if config.input_prior == "recorded" and input_stats is None:
            raise ValueError("input_prior='recorded' needs input_stats: pass collect_block_statistics(model, batches)[0].")

    def prior(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if i == 0 or self.config.input_prior == "none":
            return None
        if self.config.input_prior == "recorded":
            key = f"block{i}.input"
            mean, var = self.stats.mean(key), self.stats.var(key)
        else:
            prior = self.blocks.input_prior(i)
            if prior is None:
                return None
            mean, var = prior
        return mean.to(self.device, self.dtype), var.to(self.device, self.dtype)

    def real_variance(self, i: int) -> float | None:
        """Mean per-channel variance of real inputs of block i (recorded statistics), if known."""
        key = f"block{i}.input"
        if self.stats is None or key not in self.stats:
            return None
        return self.stats.var(key).mean().item()

    def start(self, i: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Random start of block i's input: a sample of its prior, per channel (pixels: N(0, init_std^2))."""
        shape = self.blocks.input_shape(i)
        noise = torch.randn(batch, *shape, generator=generator).to(self.device, self.dtype)
        prior = self.prior(i)
        if prior is None:
            return noise * (self.config.init_std if i == 0 else 1.0)
        mean, var = prior
        return mean.view(1, -1, 1, 1) + var.clamp_min(0).sqrt().view(1, -1, 1, 1) * noise

    def block_terms(self, i: int, z: torch.Tensor, target: torch.Tensor, end: int | None = None):
        """Terms of the link of blocks ``i .. end-1`` (default: block i alone) for its input z."""
        end = i + 1 if end is None else end
        points = [(f"bn{j}.{k}", m, "input") for j in range(i, end) for k, (_, m) in enumerate(self.blocks.bn_layers(j))]
        with capture_activations(points) as acts:
            out = self.blocks.forward_from(i, z, end=end)
        if end - 1 == self.blocks.feature_block:
            out = self.blocks.pool(out)
        stat = sum((bn_kl(acts[key], m) for key, m, _ in points), z.new_zeros(()))
        prior = self.prior(i)
        l_in = kl_to_prior(z, *prior) if prior is not None else None
        return F.mse_loss(out, target), stat, l_in

    def full_terms(self, x: torch.Tensor, target: torch.Tensor):
        points = [(name, m, "input") for name, m in self.blocks.all_bn_layers(0)]
        with capture_activations(points) as acts:
            out = self.blocks.features_from(0, x)
        stat = sum((bn_kl(acts[key], m) for key, m, _ in points), x.new_zeros(()))
        return F.mse_loss(out, target), stat, None


def _optimise(terms: Callable, z: torch.Tensor, steps: int, lr_at: Callable[[int], float], weight: float,
              config: BNInversionConfig, tracker: _Tracker, stage: str, cost: float, curve: list | None = None):
    """Adam on z with the reference's boosted weights; returns (best or last z, its un-boosted
    loss, its terms (mse, stat, input))."""
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr_at(0))
    a_mse, a_stat, a_in = 1.0, weight, weight
    first = None
    best, best_loss, best_terms = z.detach().clone(), math.inf, (math.nan, math.nan, None)
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        mse, stat, l_in = terms(z)
        values = (mse.item(), stat.item(), None if l_in is None else l_in.item())
        if first is None:
            first = values
        elif config.boost:  # the reference's guard against divergence
            a_mse = min(2 * a_mse, 10.0) if values[0] > first[0] else a_mse
            a_stat = min(2 * a_stat, 10 * weight) if values[1] > first[1] else a_stat
            if l_in is not None:
                a_in = min(2 * a_in, 5 * weight) if values[2] > first[2] else a_in
        loss = a_mse * mse + a_stat * stat + (a_in * l_in if l_in is not None else 0.0)
        (grad,) = torch.autograd.grad(loss, z)
        value = values[0] + weight * (values[1] + (values[2] or 0.0))
        if value < best_loss or not config.keep_best:
            best_loss, best, best_terms = value, z.detach().clone(), values
        z.grad = grad
        opt.step()
        tracker.step(stage, cost)
        if curve is not None:
            curve.append((tracker.passes, tracker.seconds, value))
    if not config.keep_best and steps > 0:  # the last iterate itself (one forward, for the report only)
        best = z.detach().clone()
        with torch.no_grad():
            mse, stat, l_in = terms(best)
        best_terms = (mse.item(), stat.item(), None if l_in is None else l_in.item())
        best_loss = best_terms[0] + weight * (best_terms[1] + (best_terms[2] or 0.0))
    tracker.stage_seconds[stage] = tracker.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0
    return best, best_loss, best_terms


def _chain(obj: _Objective, targets: torch.Tensor, config: BNInversionConfig, generator, tracker, diagnostics):
    """The per-layer stage on one chunk: links from the top block down to the stem; returns pixels."""
    blocks = obj.blocks
    costs = blocks.block_costs()
    links = blocks.stage_groups() if config.chain == "stages" else [(i, i + 1) for i in range(blocks.feature_block + 1)]
    weight = config.layer_weight(len(links))
    z_next = targets
    for i, end in reversed(links):
        z, loss, (mse, stat, l_in) = _optimise(
            lambda v, i=i, end=end, t=z_next.detach(): obj.block_terms(i, v, t, end),
            obj.start(i, targets.shape[0], generator), config.layer_steps, lambda s: config.layer_lr, weight, config,
            tracker, f"block{i}", sum(costs[i:end]),
        )
        with torch.no_grad():
            forward_mse = F.mse_loss(blocks.features_from(i, z), targets).item()
        prior = obj.prior(i)
        d = diagnostics.setdefault(f"block{i}", [])
        d.append({
            "loss": loss, "mse": mse, "stat": stat, "input_kl": l_in, "forward_feature_mse": forward_mse,
            "solved_variance": channel_moments(z)[1].mean().item(),
            "prior_variance": None if prior is None else prior[1].mean().item(),
            "real_variance": obj.real_variance(i),
        })
        z_next = z
    return z_next


def invert_bn(model: nn.Module, targets: torch.Tensor, config: BNInversionConfig | None = None,
              input_stats: LayerStatistics | None = None, image_size: int | None = None) -> BNInversionResult:
    """Invert pooled-feature targets ``(B, D)`` of a BatchNorm classifier to pixels (see module docstring).

    The model runs in eval mode (BN uses its running moments) with parameters frozen; both are
    restored afterwards. `input_stats` (from `collect_block_statistics`) is needed for
    ``input_prior="recorded"`` and adds real input variances to the diagnostics.

    The report: ``mode``, ``num_targets``, ``steps`` and ``stage_passes`` / ``stage_seconds`` per stage
    (``block{i}``, ``refine``, ``full``), ``full_model_passes``, ``seconds``; per chain block
    ``block_loss`` (un-boosted loss, MSE, BN KL sum, input KL at the kept iterate, and
    ``forward_feature_mse``: the feature MSE when that block's solution is run forward through the
    real network, so how far the chain drifts) and ``block_variance`` (mean per-channel variance of the
    solved input, of the prior and of real inputs); ``start_loss`` / ``start_feature_mse`` (the
    refinement's start, mode "pmi"); ``final_loss`` (the refinement objective of the samples, un-boosted),
    ``final_feature_mse``; ``curve``: ``(passes, seconds, loss)`` at every full-model step, passes and
    seconds cumulated (the chain included), loss averaged over chunks by size.
    """
    config = config or BNInversionConfig()
    blocks = BNBlocks(model, image_size)
    dim = blocks.input_shape(blocks.num_blocks - 1)[0]
    if targets.dim() != 2 or targets.shape[1] != dim:
        raise ValueError(f"targets must be (B, {dim}) pooled features, got {tuple(targets.shape)}.")
    param = next(blocks.model.parameters())
    device, dtype = param.device, param.dtype
    obj = _Objective(blocks, config, input_stats, device, dtype)
    targets = targets.detach().to(device, dtype)
    generator = torch.Generator().manual_seed(config.inversion_seed)
    chain_cost = sum(blocks.block_costs()[: blocks.feature_block + 1])
    tracker = _Tracker()
    diagnostics: dict[str, list[dict]] = {}
    samples, pieces, starts = [], [], []
    with eval_mode(blocks.model), _frozen(blocks.model), torch.enable_grad():
        chunks = list(targets.split(config.layer_batch))
        refine_chunks = sum(math.ceil(c.shape[0] / config.refine_batch) for c in chunks)
        full_steps = config.full_steps or config.full_budget_steps(len(chunks), refine_chunks)
        lr_full = config.full_lr or config.refine_lr
        for chunk in chunks:
            if config.mode == "pmi":
                x0 = _chain(obj, chunk, config, generator, tracker, diagnostics)
                steps, lr, stage = config.refine_steps, config.refine_lr, "refine"
            else:
                x0 = obj.start(0, chunk.shape[0], generator)
                steps, lr, stage = full_steps, lr_full, "full"
            for x, t in zip(x0.split(config.refine_batch), chunk.split(config.refine_batch)):
                with torch.no_grad():
                    mse0, stat0, _ = obj.full_terms(x, t)
                starts.append((t.shape[0], mse0.item() + config.alpha_rf * stat0.item(), mse0.item()))
                curve: list = []
                mark = (tracker.passes, tracker.seconds)
                lr_at = lambda s, n=steps, lr=lr: step_lr(s, n, lr, config.warmup, config.milestones, config.gamma)
                x, loss, _ = _optimise(lambda v, t=t: obj.full_terms(v, t), x, steps, lr_at, config.alpha_rf, config,
                                       tracker, stage, chain_cost, curve)
                samples.append(x)
                pieces.append((t.shape[0], loss, [(p - mark[0], sec - mark[1], v) for p, sec, v in curve]))
        samples = torch.cat(samples)
        with torch.no_grad():
            final_mse = F.mse_loss(torch.cat([blocks.features_from(0, s) for s in samples.split(config.refine_batch)]),
                                   targets).item()
    n = targets.shape[0]
    length = min((len(c) for _, _, c in pieces), default=0)
    chain_passes = sum(v for k, v in tracker.stage_passes.items() if k.startswith("block"))
    chain_seconds = sum(v for k, v in tracker.stage_seconds.items() if k.startswith("block"))
    curve = []
    for j in range(length):  # every chain, plus every refinement chunk brought to its step j
        curve.append((chain_passes + sum(c[j][0] for _, _, c in pieces), chain_seconds + sum(c[j][1] for _, _, c in pieces),
                      sum(size * c[j][2] for size, _, c in pieces) / n))
    report = {
        "mode": config.mode,
        "num_targets": n,
        "num_chunks": len(pieces),
        "steps": dict(tracker.steps),
        "stage_passes": dict(tracker.stage_passes),
        "stage_seconds": dict(tracker.stage_seconds),
        "full_model_passes": tracker.passes,
        "seconds": tracker.seconds,
        "block_loss": {k: _mean_dicts(v, ("loss", "mse", "stat", "input_kl", "forward_feature_mse")) for k, v in diagnostics.items()},
        "block_variance": {k: _mean_dicts(v, ("solved_variance", "prior_variance", "real_variance")) for k, v in diagnostics.items()},
        "final_loss": sum(size * loss for size, loss, _ in pieces) / n,
        "final_feature_mse": final_mse,
        "curve": curve,
        "config": config.to_dict(),
    }
    if config.mode == "pmi":
        report["start_loss"] = sum(size * loss for size, loss, _ in starts) / n
        report["start_feature_mse"] = sum(size * mse for size, _, mse in starts) / n
    return BNInversionResult(samples=samples, report=report)


def _mean_dicts(items: list[dict], keys) -> dict[str, float | None]:
    out = {}
    for k in keys:
        vals = [d[k] for d in items if d.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def replay_targets(bank, class_ids, per_class: int, generator: torch.Generator | None = None,
                   selection: str = "gaussian", target_classes: str = "equal", cfs_step: int | None = None,
                   **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` targets of every class from a `hf_pmi.bank.FeatureBank` (``target_classes="equal"``), or as
    many targets in all with each one's class drawn uniformly (``"random"``, the reference's buffer), **shuffled
    across classes** (the reference shuffles before batching: the chain's BN moments are batch moments, and a
    batch of one class would be pushed toward the statistics of all). With `cfs_step`, a class's CFS batch is
    ``max(its targets // cfs_step, 2)`` (the reference's ``cont_step``). Returns (features, labels).

    Example:
        >>> from hf_pmi.bank import FeatureBank
        >>> bank = FeatureBank(covariance="diag")
        >>> bank.add_classes([0, 1], {0: torch.randn(8, 3), 1: torch.randn(8, 3) + 5})
        >>> g = torch.Generator().manual_seed(0)
        >>> feats, labels = replay_targets(bank, [0, 1], 6, g, target_classes="random")
        >>> feats.shape, len(labels), labels.bincount().tolist() != [6, 6]
        (torch.Size([12, 3]), 12, True)
    """
    class_ids = [int(c) for c in class_ids]
    counts = [per_class] * len(class_ids)
    if target_classes == "random":
        draws = torch.randint(0, len(class_ids), (per_class * len(class_ids),), generator=generator)
        counts = torch.bincount(draws, minlength=len(class_ids)).tolist()
    elif target_classes != "equal":
        raise ValueError(f"target_classes must be 'equal' or 'random', got {target_classes!r}.")
    feats, labels = [], []
    for c, n in zip(class_ids, counts):
        if n:
            extra = {"batch": max(n // cfs_step, 2)} if cfs_step else {}
            f, y = bank.sample([c], n, generator, selection, **kwargs, **extra)
            feats.append(f)
            labels.append(y)
    if not feats:
        return torch.empty(0, bank.feature_dim or 0), torch.empty(0, dtype=torch.int64)
    feats, labels = torch.cat(feats), torch.cat(labels)
    perm = torch.randperm(labels.shape[0], generator=generator)
    return feats[perm], labels[perm]
