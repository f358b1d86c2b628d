"""Per-layer model inversion (PMI) and full-model refinement (method.md, steps 5-7).

Given target image features (sampled from the feature bank), PMI walks the vision tower
backwards, one block at a time: the input of block ``i`` is optimised so that the block maps it
onto the solution found for block ``i + 1`` while its activation statistics stay close to the
stored ones. One step on block ``i`` costs only that block's share of a full forward/backward,
so a good starting point for the full-model refinement is reached far more cheaply than by
refining from noise (``mode="full"``, the DeepInversion-style baseline).

Cost accounting (the ``full_model_passes`` of the report): one pass = one forward + backward of
the whole vision tower, blocks ``0 .. L+2``. A step that runs blocks ``i .. j`` forward and back
counts ``sum(block_costs()[i..j])``: a per-layer step on block ``i`` counts ``block_costs()[i]``,
a refinement step from ``start_block`` counts ``sum(block_costs()[start_block:])``. The shares
come from multiply-adds; backward is taken to cost the same multiple of forward in every block,
so counting forward-only or forward+backward gives the same numbers.

Example:
    >>> import torch
    >>> from hf_pmi.inversion import InversionConfig, invert
    >>> from hf_pmi.statistics import collect_layer_statistics
    >>> from hf_pmi.testing import build_clip
    >>> model = build_clip("tiny")
    >>> stats = collect_layer_statistics(model, [torch.randn(16, 3, 32, 32)])
    >>> config = InversionConfig(layer_steps=5, first_block_steps=8, upsample_at=(2, 4, 6), refine_steps=5)
    >>> result = invert(model, torch.randn(4, 16), stats, config, progress=False)
    >>> tuple(result.samples.shape), len(result.report["curve"])
    ((4, 32, 8, 8), 5)
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import VisionBlocks
from .statistics import LayerStatistics, capture_activations, eval_mode, kl_moments, token_moments


@dataclass
class InversionConfig:
    """Settings of `invert` / `synthesize_replay`; defaults are the reference's CLIP settings."""

    mode: str = field(
        default="pmi",
        metadata={"help": "'pmi': per-layer inversion then full-model refinement; 'full': refinement only, from a "
                  "random start (the DeepInversion-style baseline of the paper's efficiency claim)."},
    )
    start_block: int = field(
        default=1,
        metadata={"help": "Block whose input is synthesised: 1 = patch-embedding maps (reference; the patch "
                  "embedding is frozen, so replay there is exact), 0 = pixels."},
    )
    batch_size: int = field(
        default=40,
        metadata={"help": "Targets inverted together (reference per-layer batch 40). Activation moments are taken "
                  "over the batch, so it is shared by both stages here (the reference refines in 20s)."},
    )
    # ----- per-layer stage (method.md step 5)
    layer_steps: int = field(default=200, metadata={"help": "Adam steps per block (reference 200)."})
    layer_lr: float = field(default=0.1, metadata={"help": "Adam learning rate of the per-layer stage (reference 0.1)."})
    a_layer: float = field(
        default=0.03,
        metadata={"help": "Weight of the statistics KL terms per block: alpha_rf * num_blocks * rf_factor = "
                  "0.002 * 15 * 1 in the reference (0.2 * 15 for CUB)."},
    )
    first_block_steps: int = field(
        default=1200, metadata={"help": "Steps of the coarse-to-fine inversion of the lowest block, block 1 (reference 1200)."}
    )
    upsample_at: list[int] = field(
        default_factory=lambda: [300, 600, 900],
        metadata={"help": "Steps at which the coarse patch map is upsampled x2 with a fresh optimiser (reference)."},
    )
    coarse_size: int = field(
        default=2, metadata={"help": "Initial spatial size of the coarse patch map: the grid of a 32 px image at patch 16 (reference)."}
    )
    cls_target_last_layer: bool = field(
        default=True,
        metadata={"help": "Beyond the reference: the post block reads only the CLS token, so the last encoder layer "
                  "matches only the CLS token of its target; the other tokens of the post block's input are random "
                  "(untouched by the feature loss) and matching them drives noise down the chain. False = reference."},
    )
    first_layer_in_ln_range: bool = field(
        default=True,
        metadata={"help": "Beyond the reference: the first encoder layer's input is a pre-layernorm output with a fixed "
                  "CLS token, so it is optimised as pre_layrnorm([cls + pos_0, u]) over u; block 1 can then reach its "
                  "target. False = reference (a free input, often unreachable by block 1)."},
    )
    layer_init: str = field(
        default="noise",
        metadata={"help": "Start of each block's variable in the per-layer stage (all beyond the reference but "
                  "'noise'). 'noise' (reference): an independent sample of the block's stored input moments, so "
                  "each block's solution is random noise the blocks below must reproduce. 'forward': one "
                  "stored-moment sample of the lowest block's input is run forward once (counted as a pass) and "
                  "block i starts from that sample's own input of block i, a consistent chain whose tokens the "
                  "blocks below can reach. 'target': encoder layers are residual, so block i starts from its target "
                  "z_{i+1} (the first layer and the patch map through the exact inverse of the pre-layernorm; the "
                  "post block from the 'forward' tokens). Measured on the mini-CLIP digits benchmark (20 targets): "
                  "with 50 steps/block + 150 refinement steps, refinement starts at 1.16 ('forward') / 1.94 "
                  "('target') / 1.58 ('noise') and ends at 0.201 / 0.231 / 0.227; with the reference budgets "
                  "'forward' ends at 0.0522 vs 0.0519 for 'noise'. No gain at the reference budgets, so the "
                  "default stays 'noise'."},
    )
    # ----- full-model refinement (method.md step 6)
    refine_steps: int = field(default=600, metadata={"help": "Full-model refinement steps after PMI (reference 600)."})
    refine_lr: float = field(default=0.01, metadata={"help": "Adam lr of the refinement, cosine-decayed (reference 0.01; 0.02 CUB)."})
    alpha_rf: float = field(default=0.002, metadata={"help": "Weight of the encoder-layer-input KL in the refinement (reference 0.002; 0.2 CUB)."})
    alpha_tv: float = field(default=0.005, metadata={"help": "Weight of the squared-difference total variation of the input (reference 0.005)."})
    # ----- baseline (mode="full")
    full_steps: int = field(
        default=2000,
        metadata={"help": "Refinement steps from a random start in mode='full' (2000: DeepInversion's iteration budget)."},
    )
    full_lr: float = field(
        default=0.03,
        metadata={"help": "Adam lr of mode='full' (cosine). Tuned for the strongest baseline: on the digits benchmark "
                  "(1500 steps) 0.03 reached a lower loss than 0.1 (0.038 vs 0.056); the refinement's 0.01 is made "
                  "for a start that is already close."},
    )
    # ----- objective details
    normalize_features: bool = field(
        default=False, metadata={"help": "Match L2-normalised features (the semantic-projection path of method.md uses this)."}
    )
    keep_best: bool = field(default=True, metadata={"help": "Keep the iterate with the lowest loss of each stage (reference)."})
    # ----- replay targets (method.md steps 4 and 7)
    per_class: int = field(default=5, metadata={"help": "Replay samples per seen class (reference 5)."})
    selection: str = field(default="cfs", metadata={"help": "'cfs' (contrastive feature selection, reference) or 'gaussian'."})
    boost: int = field(default=20, metadata={"help": "CFS selects per_class * boost features, then keeps per_class at random (reference 20)."})
    cfs_batch: int = field(default=20, metadata={"help": "CFS acceptance batch b (reference 20)."})
    rho: float = field(default=0.5, metadata={"help": "CFS acceptance ratio: b / rho candidates per round (reference 0.5)."})
    tau: float = field(default=1.0, metadata={"help": "Temperature of the contrastive similarity (reference 1)."})
    exact_standardise: bool = field(
        default=False, metadata={"help": "Exact moment standardisation after CFS instead of the reference formula."}
    )
    inversion_seed: int = field(default=0, metadata={"help": "Seed of target sampling and random starts (the trainer uses its own --seed)."})

    def __post_init__(self):
        if self.mode not in ("pmi", "full"):
            raise ValueError(f"mode must be 'pmi' or 'full', got {self.mode!r}.")
        if self.selection not in ("cfs", "gaussian"):
            raise ValueError(f"selection must be 'cfs' or 'gaussian', got {self.selection!r}.")
        if self.layer_init not in ("noise", "target", "forward"):
            raise ValueError(f"layer_init must be 'noise', 'forward' or 'target', got {self.layer_init!r}.")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (moments are taken over the batch), got {self.batch_size}.")
        self.upsample_at = [int(s) for s in self.upsample_at]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class InversionResult:
    """``samples``: inputs of ``config.start_block`` (patch maps ``(B, D, g, g)`` for block 1);
    ``report``: steps, costs, timings and the loss curve (see `invert`)."""

    samples: torch.Tensor
    report: dict[str, Any]


# ----- objective pieces -------------------------------------------------------------------------
def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Squared-difference total variation over the 4 neighbour directions (right, down and the two
    diagonals, as DeepInversion), each the mean of squared differences; 0 for non-image inputs."""
    if x.dim() != 4:
        return x.new_zeros(())
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return sum(d.pow(2).mean() for d in (d1, d2, d3, d4))


def feature_mse(out: torch.Tensor, target: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    if normalize:
        out, target = F.normalize(out, dim=-1), F.normalize(target, dim=-1)
    return F.mse_loss(out, target)


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off for every parameter (no weight gradients are built); restore after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Objective:
    """Losses of single blocks and of the full model, given the stored statistics."""

    def __init__(self, blocks: VisionBlocks, stats: LayerStatistics, config: InversionConfig, device, dtype):
        self.blocks, self.stats, self.config = blocks, stats, config
        self.device, self.dtype = device, dtype
        self.L = blocks.num_layers
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.trajectory: list[torch.Tensor] | None = None

    @torch.no_grad()
    def forward_trajectory(self, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Inputs of every block (index = block) for one stored-moment sample of the lowest block's input;
        the last entry holds the tokens before the pre-layernorm (the first layer's start under
        ``first_layer_in_ln_range``). Consistent: each entry is an exact preimage of the next."""
        start = self.config.start_block
        x = self.sample_input(start, batch, generator)
        out: list[torch.Tensor] = [x] * (start + 1)
        for i in range(start, self.blocks.num_blocks - 1):
            x = self.blocks.block(i, x)
            out.append(x)
        p = out[1] if start <= 1 else None
        if p is not None:
            tokens = p.flatten(2).transpose(1, 2)
            emb = self.blocks.embeddings
            cls = emb.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
            out.append(torch.cat([cls, tokens], dim=1) + emb.position_embedding.weight[None])
        return out

    def moments(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._cache:
            if key not in self.stats:
                raise KeyError(
                    f"The layer statistics lack {key!r} (they hold {self.stats.keys()}): collect them with "
                    "hf_pmi.statistics.collect_layer_statistics on the same architecture."
                )
            m = self.stats.mean(key).to(self.device, self.dtype)
            v = self.stats.var(key).to(self.device, self.dtype)
            self._cache[key] = (m, v)
        return self._cache[key]

    def input_key(self, i: int) -> str | None:
        """Statistics key of block i's input (None for pixels, which have no stored statistics).

        The post block's input is the last layer's output: "post_input" when recorded, else the
        last layer's input (the closest stored residual-stream statistics)."""
        if i == 0:
            return None
        if i == 1:
            return "patch"
        if i == self.L + 2:
            return "post_input" if "post_input" in self.stats else f"layer{self.L - 1}.input"
        return f"layer{i - 2}.input"

    def hooked(self, i: int) -> list[tuple[str, nn.Module, str]]:
        """Activations inside block i whose statistics enter its KL term."""
        if i == 1:
            return [("pre_ln_input", self.blocks.pre_layrnorm, "input")]
        if 2 <= i <= self.L + 1:
            layer = self.blocks.layers[i - 2]
            k = i - 2
            return [(f"layer{k}.ln1", layer.layer_norm1, "output"), (f"layer{k}.ln2", layer.layer_norm2, "output")]
        return []

    def kl(self, key: str, x: torch.Tensor) -> torch.Tensor:
        m, v = token_moments(x)
        return kl_moments(m, v, *self.moments(key))

    def block_loss(self, i: int, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE(block_i(z), target) + a_layer * [sum_h KL(h) + KL(input)]."""
        with capture_activations(self.hooked(i)) as acts:
            out = self.blocks.block(i, z)
        if i == self.blocks.num_blocks - 1:
            loss = feature_mse(out, target, self.config.normalize_features)
        elif i == self.L + 1 and self.config.cls_target_last_layer:
            loss = F.mse_loss(out[:, 0], target[:, 0])
        else:
            loss = F.mse_loss(out, target)
        reg = sum((self.kl(key, acts[key]) for key, _, _ in self.hooked(i)), z.new_zeros(()))
        key = self.input_key(i)
        if key is not None:
            reg = reg + self.kl(key, z)
        return loss + self.config.a_layer * reg

    def full_loss(self, start: int, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE(F(x), target) + alpha_rf * sum_k KL(layer k input) + alpha_tv * TV(x)."""
        points = [(f"layer{k}.input", layer, "input") for k, layer in enumerate(self.blocks.layers) if k + 2 >= start]
        with capture_activations(points) as acts:
            out = self.blocks.forward_from(start, x)
        kl = sum((self.kl(key, acts[key]) for key, _, _ in points), x.new_zeros(()))
        return (
            feature_mse(out, target, self.config.normalize_features)
            + self.config.alpha_rf * kl
            + self.config.alpha_tv * total_variation(x)
        )

    def pre_ln(self, u: torch.Tensor) -> torch.Tensor:
        """pre_layrnorm of tokens ``u`` (B, N, D) whose CLS slot is replaced by its fixed value."""
        emb = self.blocks.embeddings
        cls = (emb.class_embedding + emb.position_embedding.weight[0]).to(u.dtype)
        return self.blocks.pre_layrnorm(torch.cat([cls.expand(u.shape[0], 1, -1), u[:, 1:]], dim=1))

    def first_layer_loss(self, u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Block-2 loss with its input in the pre-layernorm's range; u ~ "pre_ln_input" statistics."""
        m, v = token_moments(u[:, 1:])  # the CLS slot is fixed, its statistics do not apply
        m2, v2 = self.moments("pre_ln_input")
        return self.block_loss(2, self.pre_ln(u), target) + self.config.a_layer * kl_moments(m, v, m2[1:], v2[1:])

    def pre_ln_inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Tokens ``u`` before the pre-layernorm with ``pre_layrnorm(u) ~= z`` (exact where the LN gain is not
        tiny): undo the gain and bias, standardise per token, then give each token position the scale of the
        stored "pre_ln_input" moments (a layernorm forgets per-token shift and scale)."""
        ln = self.blocks.pre_layrnorm
        w, b = ln.weight.detach(), ln.bias.detach()
        w = torch.where(w.abs() < 1e-3, torch.full_like(w, 1e-3) * torch.where(w < 0, -1.0, 1.0), w)
        y = (z.detach() - b) / w
        y = (y - y.mean(-1, keepdim=True)) / (y.std(-1, unbiased=False, keepdim=True) + 1e-6)
        m, v = self.moments("pre_ln_input")
        return m.view(1, -1, 1) + v.sqrt().view(1, -1, 1) * y

    def pre_inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Patch map ``(B, D, g, g)`` whose pre block output is ~= tokens ``z`` (CLS slot ignored)."""
        u = self.pre_ln_inverse(z)[:, 1:] - self.blocks.embeddings.position_embedding.weight[1:].detach()
        g = self.blocks.grid
        return u.transpose(1, 2).reshape(z.shape[0], -1, g, g).contiguous()

    def target_start(self, i: int, target: torch.Tensor, generator: torch.Generator, size: int | None = None) -> torch.Tensor:
        """Start of block i's variable under ``layer_init``: a stored-moment sample ('noise') or, from the
        target, its (approximate) preimage ('target'). ``i = -1``: the first layer's pre-layernorm tokens."""
        if self.config.layer_init == "forward" and self.trajectory is not None:
            k = 1 if i == -1 else i
            z = self.trajectory[k] if i != -1 else self.trajectory[-1]
            if i == 1 and size is not None and size != z.shape[-1]:
                z = F.adaptive_avg_pool2d(z, size)
            return z.clone()
        if self.config.layer_init == "noise" or i == 0:
            return self.sample_input(i, target.shape[0], generator, size)
        if i == self.blocks.num_blocks - 1:
            # The post block reads only the CLS token and its target is a feature vector: start from the
            # tokens a stored-moment sample of the lowest block's input produces (a forward pass), so the
            # tokens copied down the chain are ones the blocks below can reach.
            x = self.sample_input(self.config.start_block, target.shape[0], generator)
            with torch.no_grad():
                return self.blocks.forward_from(self.config.start_block, x, end=i)
        if i == -1:
            return self.pre_ln_inverse(target)
        if i == 1:
            z = self.pre_inverse(target)
            if size is not None and size != z.shape[-1]:
                z = F.adaptive_avg_pool2d(z, size)
            return z
        return target.detach().clone()  # residual layer: input ~ output

    def sample_input(self, i: int, batch: int, generator: torch.Generator, size: int | None = None) -> torch.Tensor:
        """Random start for block i's input: N(stored mean, stored var) per token / position.

        Pixels (block 0) have no stored statistics: N(0, 1), the scale of processor-normalised
        pixels. `size` asks for a coarse patch map (moments average-pooled to that grid). ``i = -1``:
        the tokens entering the pre-layernorm ("pre_ln_input" statistics)."""
        shape = self.blocks.input_shape(2 if i == -1 else i)
        key = "pre_ln_input" if i == -1 else self.input_key(i)  # -1: tokens before the pre-layernorm
        if key is None:
            noise = torch.randn(batch, *shape, generator=generator)
            return noise.to(self.device, self.dtype)
        mean, var = (t.cpu().float() for t in self.moments(key))
        if i == 1:
            g = self.blocks.grid
            mean, var = mean.view(1, 1, g, g), var.view(1, 1, g, g)
            if size is not None and size != g:
                mean, var = F.adaptive_avg_pool2d(mean, size), F.adaptive_avg_pool2d(var, size)
                shape = (shape[0], size, size)
        else:
            mean, var = mean.view(1, -1, 1), var.view(1, -1, 1)
        noise = torch.randn(batch, *shape, generator=generator)
        return (mean + var.sqrt() * noise).to(self.device, self.dtype)


class _Tracker:
    """Counts full-model-equivalent passes and wall time; holds the tqdm bar."""

    def __init__(self, total_steps: int, progress: bool, desc: str):
        from tqdm.auto import tqdm

        self.passes = 0.0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False)
        self.stage_passes: dict[str, float] = {}
        self.stage_seconds: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self.stage_loss: dict[str, float] = {}

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def step(self, stage: str, cost: float, loss: float) -> None:
        self.passes += cost
        self.stage_passes[stage] = self.stage_passes.get(stage, 0.0) + cost
        self.steps[stage] = self.steps.get(stage, 0) + 1
        self.bar.update(1)
        self.bar.set_postfix_str(f"{stage} loss={loss:.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _adam_loop(objective_fn, z, steps, lr, tracker, stage, cost, keep_best, schedule=False, curve=None):
    """Minimise objective_fn(z) over z with Adam; returns (best or last z, its loss)."""
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps)) if schedule else None
    best_loss, best = math.inf, z.detach().clone()
    t_stage = time.perf_counter()
    for _ in range(steps):
        loss = objective_fn(z)
        (grad,) = torch.autograd.grad(loss, z)
        value = loss.item()
        if value < best_loss or not keep_best:
            best_loss, best = value, z.detach().clone()
        z.grad = grad
        opt.step()
        if sched is not None:
            sched.step()
        tracker.step(stage, cost, value)
        if curve is not None:
            curve.append((tracker.passes, tracker.seconds, value))
    tracker.stage_seconds[stage] = tracker.stage_seconds.get(stage, 0.0) + time.perf_counter() - t_stage
    tracker.stage_loss[stage] = min(tracker.stage_loss.get(stage, math.inf), best_loss)
    return best, best_loss


def _coarse_to_fine(obj: _Objective, target, batch, generator, config, tracker):
    """Block 1 inversion: a coarse patch map, bicubically upsampled to the grid before each
    forward and itself upsampled x2 (capped at the grid) with a fresh Adam at `upsample_at`."""
    g = obj.blocks.grid
    size = min(config.coarse_size, g)
    z = obj.target_start(1, target, generator, size=size)
    cost = obj.blocks.block_costs()[1]
    stage = "block1"

    def to_grid(v):
        return v if v.shape[-1] == g else F.interpolate(v, size=(g, g), mode="bicubic", align_corners=False)

    bounds = [s for s in sorted(config.upsample_at) if 0 < s < config.first_block_steps] + [config.first_block_steps]
    best_loss, best = math.inf, to_grid(z).detach()
    done = 0
    for end in bounds:
        if done > 0 and size < g:  # the stage boundary: grow the variable
            size = min(2 * size, g)
            z = F.interpolate(z.detach(), size=(size, size), mode="bicubic", align_corners=False)
        z, loss = _adam_loop(
            lambda v: obj.block_loss(1, to_grid(v), target), z, end - done, config.layer_lr, tracker, stage, cost, True
        )
        if loss < best_loss or not config.keep_best:
            best_loss, best = loss, to_grid(z).detach()
        done = end
    return best


def _invert_chunk(obj: _Objective, targets: torch.Tensor, config: InversionConfig, generator, progress: bool):
    blocks = obj.blocks
    start, last = config.start_block, blocks.num_blocks - 1
    costs = blocks.block_costs()
    batch = targets.shape[0]
    full_cost = sum(costs[start:])
    if config.mode == "pmi":
        total = sum(config.first_block_steps if i == 1 else config.layer_steps for i in range(start, last + 1))
        total += config.refine_steps
    else:
        total = config.full_steps
    tracker = _Tracker(total, progress, desc=f"inversion ({config.mode})")
    curve: list[tuple[float, float, float]] = []
    try:
        if config.mode == "pmi":
            z_next = targets
            if config.layer_init in ("target", "forward"):  # one forward pass (counted as a whole pass)
                tracker.step("forward_init", sum(costs[start:last]), math.nan)
                obj.trajectory = obj.forward_trajectory(batch, generator) if config.layer_init == "forward" else None
            for i in range(last, start - 1, -1):
                if i == 1:
                    z_next = _coarse_to_fine(obj, z_next, batch, generator, config, tracker)
                    continue
                target_i = z_next.detach()
                if i == 2 and start <= 1 and config.first_layer_in_ln_range:
                    u, _ = _adam_loop(
                        lambda v, t=target_i: obj.first_layer_loss(v, t), obj.target_start(-1, target_i, generator),
                        config.layer_steps, config.layer_lr, tracker, "block2", costs[1] + costs[2], config.keep_best,
                    )
                    with torch.no_grad():
                        z_next = obj.pre_ln(u)
                    continue
                z_next, _ = _adam_loop(
                    lambda v, i=i, t=target_i: obj.block_loss(i, v, t),
                    obj.target_start(i, target_i, generator), config.layer_steps, config.layer_lr,
                    tracker, f"block{i}", costs[i], config.keep_best,
                )
            x0, steps, lr = z_next, config.refine_steps, config.refine_lr
        else:
            x0, steps, lr = obj.sample_input(start, batch, generator), config.full_steps, config.full_lr
        x, loss = _adam_loop(
            lambda v: obj.full_loss(start, v, targets), x0, steps, lr, tracker,
            "refine" if config.mode == "pmi" else "full", full_cost, config.keep_best, schedule=True, curve=curve,
        )
        if steps == 0:  # nothing refined: report the loss of the per-layer result itself
            with torch.no_grad():
                loss = obj.full_loss(start, x, targets).item()
    finally:
        tracker.close()
    return x.detach(), loss, curve, tracker


def invert(
    model: nn.Module,
    targets: torch.Tensor,
    stats: LayerStatistics,
    config: InversionConfig | None = None,
    progress: bool = True,
) -> InversionResult:
    """Invert target image features ``(B, P)`` to inputs of ``config.start_block``.

    ``mode="pmi"``: blocks from the last one down to ``start_block`` are inverted one at a time
    (each started as ``config.layer_init`` says, best iterate kept; block 1 coarse-to-fine),
    then the whole tower is refined. ``mode="full"``: the refinement alone, from a random start.
    Targets are processed in chunks of ``config.batch_size``. The model is put in eval mode and its
    parameters get no gradients; both are restored afterwards.

    The report holds: ``mode``, ``start_block``, ``num_targets``, ``num_chunks``, ``steps`` (per
    stage: ``block{i}``, ``refine`` or ``full``, plus ``forward_init`` (1) when ``layer_init`` is
    'forward' or 'target'; per chunk), ``stage_passes``, ``stage_seconds``,
    ``stage_loss`` (best loss of each stage's own objective, mean over chunks),
    ``full_model_passes`` (see the module docstring), ``seconds``, ``final_loss`` (the refinement
    objective of the kept samples, mean over chunks weighted by size), ``final_feature_mse`` and
    ``curve``: ``(passes, seconds, loss)`` at every refinement step (every step in mode "full"),
    passes and seconds cumulated over the chunks brought to that step, loss their weighted mean.
    """
    config = config or InversionConfig()
    blocks = VisionBlocks(model)
    if not 0 <= config.start_block < blocks.num_blocks - 1:
        raise ValueError(f"start_block must be in 0..{blocks.num_blocks - 2}, got {config.start_block}.")
    if targets.dim() != 2 or targets.shape[1] != blocks.visual_projection.out_features:
        raise ValueError(
            f"targets must be (B, {blocks.visual_projection.out_features}) image features, got {tuple(targets.shape)}."
        )
    weight = blocks.embeddings.patch_embedding.weight
    device, dtype = weight.device, weight.dtype
    obj = _Objective(blocks, stats, config, device, dtype)
    generator = torch.Generator().manual_seed(config.inversion_seed)
    targets = targets.detach().to(device, dtype)
    samples, chunk_reports = [], []
    t0 = time.perf_counter()
    with eval_mode(model), frozen_parameters(model), torch.enable_grad():
        for chunk in targets.split(config.batch_size):
            x, loss, curve, tracker = _invert_chunk(obj, chunk, config, generator, progress)
            samples.append(x)
            chunk_reports.append((chunk.shape[0], loss, curve, tracker))
        samples = torch.cat(samples)
        with torch.no_grad():
            out = torch.cat([blocks.forward_from(config.start_block, s) for s in samples.split(config.batch_size)])
            final_mse = feature_mse(out, targets, config.normalize_features).item()
    seconds = time.perf_counter() - t0

    n = targets.shape[0]
    curve = []
    for j in range(min(len(c) for _, _, c, _ in chunk_reports)):
        curve.append((
            sum(c[j][0] for _, _, c, _ in chunk_reports),
            sum(c[j][1] for _, _, c, _ in chunk_reports),
            sum(b * c[j][2] for b, _, c, _ in chunk_reports) / n,
        ))
    steps: dict[str, int] = {}
    stage_passes: dict[str, float] = {}
    stage_seconds: dict[str, float] = {}
    stage_loss: dict[str, float] = {}
    for b, _, _, tr in chunk_reports:
        for k, v in tr.stage_loss.items():
            stage_loss[k] = stage_loss.get(k, 0.0) + b * v / n
        steps.update(tr.steps)  # every chunk runs the same schedule
        for k, v in tr.stage_passes.items():
            stage_passes[k] = stage_passes.get(k, 0.0) + v
        for k, v in tr.stage_seconds.items():
            stage_seconds[k] = stage_seconds.get(k, 0.0) + v
    report = {
        "mode": config.mode,
        "start_block": config.start_block,
        "num_targets": n,
        "num_chunks": len(chunk_reports),
        "steps": steps,
        "stage_passes": stage_passes,
        "stage_seconds": stage_seconds,
        "stage_loss": stage_loss,
        "full_model_passes": sum(tr.passes for _, _, _, tr in chunk_reports),
        "seconds": seconds,
        "final_loss": sum(b * loss for b, loss, _, _ in chunk_reports) / n,
        "final_feature_mse": final_mse,
        "curve": curve,
    }
    return InversionResult(samples=samples, report=report)


# ----- replay buffer ----------------------------------------------------------------------------
def class_generator(seed: int, class_id: int) -> torch.Generator:
    """The generator of one class's targets: depends on (seed, class id) only, not on sharding."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(class_id))


def synthesize_replay(model: nn.Module, bank, class_ids, config: InversionConfig | None = None, accelerator=None, progress: bool = True):
    """Replay buffer: ``config.per_class`` inverted samples for every class in `class_ids`.

    Targets come from the bank (CFS or Gaussian, a generator per class seeded from
    ``(config.inversion_seed, class id)``). With an `accelerate.Accelerator` of several processes the classes
    are sharded round-robin, each process inverts its shard, and the results are gathered
    (padded to equal sizes, then trimmed) so that every process returns the full buffer, ordered
    as `class_ids`. Deterministic for a given seed and number of processes.

    Returns ``(samples, labels, report)``; `report` is this process's `invert` report plus
    ``classes`` (the classes it inverted) and ``num_processes``.

    Example:
        >>> import torch
        >>> from hf_pmi.bank import FeatureBank
        >>> from hf_pmi.statistics import collect_layer_statistics
        >>> from hf_pmi.testing import build_clip
        >>> model = build_clip("tiny")
        >>> bank = FeatureBank()
        >>> bank.add_classes([0, 1], {0: torch.randn(8, 16), 1: torch.randn(8, 16)}, train_contrastive=False)
        >>> bank.update_statistics(collect_layer_statistics(model, [torch.randn(8, 3, 32, 32)]))
        >>> cfg = InversionConfig(selection="gaussian", per_class=2, layer_steps=2, first_block_steps=2, refine_steps=2)
        >>> x, y, _ = synthesize_replay(model, bank, [0, 1], cfg, progress=False)
        >>> tuple(x.shape), y.tolist()
        ((4, 32, 8, 8), [0, 0, 1, 1])
    """
    config = config or InversionConfig()
    if bank.statistics is None:
        raise ValueError("The feature bank has no layer statistics: call bank.update_statistics(collect_layer_statistics(...)) first.")
    class_ids = [int(c) for c in class_ids]
    if not class_ids:
        raise ValueError("synthesize_replay needs at least one class id.")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = class_ids[rank::world]
    blocks = VisionBlocks(model)
    device = blocks.embeddings.patch_embedding.weight.device
    sample_kwargs = dict(boost=config.boost, batch=config.cfs_batch, rho=config.rho, tau=config.tau,
                         exact_standardise=config.exact_standardise)
    if mine:
        targets = torch.cat([
            bank.sample_class(c, config.per_class, class_generator(config.inversion_seed, c), config.selection, **sample_kwargs)
            for c in mine
        ])
        # Each process seeds its initialisations from (seed, rank): shards do not repeat noise.
        result = invert(model, targets, bank.statistics, dataclasses.replace(config, inversion_seed=config.inversion_seed + 7919 * rank), progress)
        samples, report = result.samples, result.report
    else:  # more processes than classes
        samples = torch.empty(0, *blocks.input_shape(config.start_block), device=device)
        report = {"full_model_passes": 0.0, "seconds": 0.0, "curve": []}
    labels = torch.tensor(mine, dtype=torch.int64, device=device).repeat_interleave(config.per_class)
    report = {**report, "classes": mine, "num_processes": world}
    if world > 1:
        per_process = math.ceil(len(class_ids) / world) * config.per_class
        pad = per_process - samples.shape[0]
        samples = torch.cat([samples, samples.new_zeros(pad, *samples.shape[1:])]).to(accelerator.device)
        labels = torch.cat([labels, labels.new_full((pad,), -1)]).to(accelerator.device)
        samples, labels = accelerator.gather(samples.contiguous()), accelerator.gather(labels.contiguous())
        keep = labels >= 0
        samples, labels = samples[keep], labels[keep]
    order = {c: j for j, c in enumerate(class_ids)}
    perm = sorted(range(labels.shape[0]), key=lambda j: order[int(labels[j])])  # stable: keeps per-class order
    perm = torch.tensor(perm, dtype=torch.long, device=labels.device)
    return samples[perm], labels[perm], report
