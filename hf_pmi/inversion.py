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


# The reference CLIP inversion (method.md; the differences table of shared/inversion-notes.md) as the
# values of the settings that differ from hf_pmi's defaults. `InversionConfig(preset="reference")`
# applies them to every field left at its default.
REFERENCE_PRESET: dict[str, Any] = {
    "cls_target_last_layer": False,  # notes #2: the last layer matches all tokens
    "first_layer_in_ln_range": False,  # notes #3: the first layer's input is a free variable
    "patch_stats": "channel",  # notes #5: per-channel patch-map moments, KL on the coarse variable
    "pre_block_kl": False,  # notes #6: no statistic hooks in the pre block
    "keep_best": "layers",  # notes #9: best iterate above block 1 only
    "refine_t_max": 2000,  # notes #11: cosine T_max 2000 over 600 steps
    "tv": "norm",  # notes #12: L2 norm of the differences
    "refine_batch_size": 20,  # notes #13: per-layer batch 40, refinement in chunks of 20
    "full_space": "pixel",  # notes #14: the full-model path inverts pixels (32 of 224 px, up-sampled)
    "full_lr": 0.1,
    "full_t_max": 2000,
}
PRESETS = {"reference": REFERENCE_PRESET}


@dataclass
class InversionConfig:
    """Settings of `invert` / `synthesize_replay`; defaults are the reference's CLIP settings except
    where a field says "beyond the reference". ``preset="reference"`` gives the reference's CLIP
    inversion as a whole (`REFERENCE_PRESET`).

    Example:
        >>> InversionConfig(preset="reference").tv, InversionConfig().tv
        ('norm', 'squared')
        >>> InversionConfig(preset="reference", refine_batch_size=10).refine_batch_size  # a non-default value wins
        10

    A field given explicitly at hf_pmi's default value cannot be told from one left alone: the preset sets it.
    """

    preset: str = field(
        default="",
        metadata={"help": "'reference': every setting that differs from the reference CLIP inversion is set to the "
                  "reference's behaviour (fields given explicitly keep their value). '': hf_pmi's defaults."},
    )
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
        metadata={"help": "Targets inverted together in the per-layer stage (reference 40). Activation moments are "
                  "taken over the batch."},
    )
    refine_batch_size: int = field(
        default=0,
        metadata={"help": "Targets refined together (reference 20: the per-layer batch is refined in chunks). 0: the "
                  "per-layer batch is refined whole."},
    )
    # ----- per-layer stage (method.md step 5)
    layer_steps: int = field(default=200, metadata={"help": "Adam steps per block (reference 200)."})
    layer_lr: float = field(default=0.1, metadata={"help": "Adam learning rate of the per-layer stage (reference 0.1)."})
    a_layer: float | None = field(
        default=None,
        metadata={"help": "Weight of the statistics KL terms per block. Default: the reference's alpha_rf * number "
                  "of blocks * rf_factor (rf_factor 1): 0.002 * 15 = 0.03 for ViT-B/16 (0.2 * 15 for CUB)."},
    )
    first_block_steps: int = field(
        default=1200, metadata={"help": "Steps of the coarse-to-fine inversion of the lowest block, block 1 (reference 1200)."}
    )
    upsample_at: list[int] = field(
        default_factory=lambda: [300, 600, 900],
        metadata={"help": "Steps at which the coarse variable is upsampled x2 with a fresh optimiser (reference)."},
    )
    coarse_size: int = field(
        default=2, metadata={"help": "Initial spatial size of the coarse patch map: the grid of a 32 px image at patch 16 (reference)."}
    )
    cls_target_last_layer: bool = field(
        default=True,
        metadata={"help": "Beyond the reference: the post block reads only the CLS token, so the last encoder layer "
                  "matches only the CLS token of its target (refinement starts at 2.78 instead of 3.25 on the mini "
                  "letters CLIP, inversion-notes.md). False = reference."},
    )
    first_layer_in_ln_range: bool = field(
        default=True,
        metadata={"help": "Beyond the reference: the first encoder layer's input is a pre-layernorm output with a fixed "
                  "CLS token, so it is optimised as pre_layrnorm([cls + pos_0, u]) over u. False = reference (a free "
                  "input, often unreachable by block 1)."},
    )
    patch_stats: str = field(
        default="position",
        metadata={"help": "Moments of the patch map (block 1's input): 'position' (beyond the reference: per spatial "
                  "position over batch and channels) or 'channel' (reference: per channel over batch and positions; "
                  "the KL is then taken on the coarse variable)."},
    )
    pre_block_kl: bool = field(
        default=True,
        metadata={"help": "Beyond the reference: block 1's loss includes the KL of the pre-layernorm input. False = "
                  "reference (no statistic hooks in the pre block)."},
    )
    keep_best: str = field(
        default="all",
        metadata={"help": "Which stages return their best iterate (the others their last): 'all', or 'layers' "
                  "(reference: the blocks above block 1 only)."},
    )
    # ----- full-model refinement (method.md step 6)
    refine_steps: int = field(default=600, metadata={"help": "Full-model refinement steps after PMI (reference 600)."})
    refine_lr: float = field(default=0.01, metadata={"help": "Adam lr of the refinement, cosine-decayed (reference 0.01; 0.02 CUB)."})
    refine_t_max: int = field(
        default=0,
        metadata={"help": "Period T_max of the refinement's cosine schedule; 0 = refine_steps, so the lr decays to 0. "
                  "The reference uses 2000 over 600 steps (the lr ends near 0.8 x its start)."},
    )
    alpha_rf: float = field(default=0.002, metadata={"help": "Weight of the encoder-layer-input KL in the refinement (reference 0.002; 0.2 CUB)."})
    alpha_tv: float = field(default=0.005, metadata={"help": "Weight of the total variation of the input (reference 0.005)."})
    tv: str = field(
        default="squared",
        metadata={"help": "Total variation over the 4 neighbour directions: 'squared' (mean of squared differences, "
                  "DeepInversion's) or 'norm' (reference: L2 norm of the differences over space, mean over batch and "
                  "channels)."},
    )
    # ----- baseline (mode="full")
    full_steps: int = field(
        default=2000,
        metadata={"help": "Refinement steps from a random start in mode='full' (2000: DeepInversion's iteration budget)."},
    )
    full_lr: float = field(
        default=0.03,
        metadata={"help": "Adam lr of mode='full' (cosine). In patch space 0.03 reached a lower loss than 0.1 on the "
                  "digits benchmark (0.038 vs 0.056); the reference's pixel path uses 0.1."},
    )
    full_t_max: int = field(default=0, metadata={"help": "Cosine period of mode='full'; 0 = full_steps (reference 2000)."})
    full_space: str = field(
        default="patch",
        metadata={"help": "Variable of mode='full': 'patch' (patch maps from a stored-moment start, the input replay "
                  "uses) or 'pixel' (reference: pixels in [0, 1] from uniform noise at 32/224 of the image size, "
                  "bicubically up-sampled before each forward and doubled at `upsample_at`, clamped after each "
                  "step; the result is patch-embedded for replay)."},
    )
    # ----- objective details
    normalize_features: bool = field(
        default=False, metadata={"help": "Match L2-normalised features (the semantic-projection path of method.md uses this)."}
    )
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
        choices = {"preset": ("", *PRESETS), "mode": ("pmi", "full"), "selection": ("cfs", "gaussian"),
                   "patch_stats": ("position", "channel"),
                   "keep_best": ("all", "layers"), "tv": ("squared", "norm"), "full_space": ("patch", "pixel")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"InversionConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if self.preset:
            defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                        for f in dataclasses.fields(self)}
            for name, value in PRESETS[self.preset].items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (moments are taken over the batch), got {self.batch_size}.")
        if self.refine_batch_size == 1 or self.refine_batch_size < 0:
            raise ValueError(f"refine_batch_size must be 0 (= batch_size) or >= 2, got {self.refine_batch_size}.")
        self.upsample_at = [int(s) for s in self.upsample_at]

    def layer_weight(self, num_blocks: int) -> float:
        """The per-block KL weight: ``a_layer``, or the reference's alpha_rf * num_blocks."""
        return self.a_layer if self.a_layer is not None else self.alpha_rf * num_blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class InversionResult:
    """``samples``: inputs of ``config.start_block`` (patch maps ``(B, D, g, g)`` for block 1);
    ``report``: steps, costs, timings and the loss curve (see `invert`)."""

    samples: torch.Tensor
    report: dict[str, Any]


# ----- objective pieces -------------------------------------------------------------------------
# CLIP's image normalisation (OpenAI's statistics, the CLIPImageProcessor default): the reference's
# pixel path optimises pixels in [0, 1] and normalises them with these before the patch embedding.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REFERENCE_PIXEL_START = 32 / 224  # the reference starts pixel inversion at 32 px of ViT-B/16's 224


def total_variation(x: torch.Tensor, kind: str = "squared") -> torch.Tensor:
    """Total variation over the 4 neighbour directions (right, down and the two diagonals); 0 for
    non-image inputs. ``kind="squared"``: the mean of squared differences per direction
    (DeepInversion's); ``"norm"``: the L2 norm of the differences over space per (sample, channel),
    averaged over samples and channels (the reference's CLIP inversion).

    Example:
        >>> x = torch.zeros(1, 1, 2, 2); x[0, 0, 0, 0] = 1.0
        >>> round(total_variation(x).item(), 4), round(total_variation(x, "norm").item(), 4)
        (2.0, 3.0)
    """
    if x.dim() != 4:
        return x.new_zeros(())
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )
    if kind == "norm":
        return sum(d.flatten(2).norm(dim=2).mean() for d in diffs)
    return sum(d.pow(2).mean() for d in diffs)


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


def _up(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic up-sampling of a coarse map to ``size`` (the identity at that size)."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


class _Objective:
    """Losses of single blocks and of the full model, given the stored statistics."""

    def __init__(self, blocks: VisionBlocks, stats: LayerStatistics, config: InversionConfig, device, dtype):
        self.blocks, self.stats, self.config = blocks, stats, config
        self.device, self.dtype = device, dtype
        self.L = blocks.num_layers
        self.a_layer = config.layer_weight(blocks.num_blocks)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def moments(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._cache:
            if key not in self.stats:
                raise KeyError(
                    f"The layer statistics lack {key!r} (they hold {self.stats.keys()}): collect them with "
                    "hf_pmi.statistics.collect_layer_statistics on the same architecture (banks saved before "
                    "'patch_channel' existed need new statistics for patch_stats='channel')."
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
            return "patch_channel" if self.config.patch_stats == "channel" else "patch"
        if i == self.L + 2:
            return "post_input" if "post_input" in self.stats else f"layer{self.L - 1}.input"
        return f"layer{i - 2}.input"

    def hooked(self, i: int) -> list[tuple[str, nn.Module, str]]:
        """Activations inside block i whose statistics enter its KL term."""
        if i == 1:
            return [("pre_ln_input", self.blocks.pre_layrnorm, "input")] if self.config.pre_block_kl else []
        if 2 <= i <= self.L + 1:
            layer = self.blocks.layers[i - 2]
            k = i - 2
            return [(f"layer{k}.ln1", layer.layer_norm1, "output"), (f"layer{k}.ln2", layer.layer_norm2, "output")]
        return []

    def kl(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key == "patch_channel":  # (B, D, h, w): a channel is a "token", moments over batch and positions
            x = x.flatten(2)
        m, v = token_moments(x)
        return kl_moments(m, v, *self.moments(key))

    def block_loss(self, i: int, z: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
        """MSE(block_i(z), target) + a_layer * [sum_h KL(h) + KL(input)]. For block 1 the input KL is
        taken on the coarse variable `coarse` under per-channel statistics (the reference)."""
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
            reg = reg + self.kl(key, coarse if key == "patch_channel" and coarse is not None else z)
        return loss + self.a_layer * reg

    def full_loss(self, start: int, x: torch.Tensor, target: torch.Tensor, tv_input: torch.Tensor | None = None) -> torch.Tensor:
        """MSE(F(x), target) + alpha_rf * sum_k KL(layer k input) + alpha_tv * TV(tv_input, default x)."""
        points = [(f"layer{k}.input", layer, "input") for k, layer in enumerate(self.blocks.layers) if k + 2 >= start]
        with capture_activations(points) as acts:
            out = self.blocks.forward_from(start, x)
        kl = sum((self.kl(key, acts[key]) for key, _, _ in points), x.new_zeros(()))
        return (
            feature_mse(out, target, self.config.normalize_features)
            + self.config.alpha_rf * kl
            + self.config.alpha_tv * total_variation(x if tv_input is None else tv_input, self.config.tv)
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
        return self.block_loss(2, self.pre_ln(u), target) + self.a_layer * kl_moments(m, v, m2[1:], v2[1:])

    def sample_input(self, i: int, batch: int, generator: torch.Generator, size: int | None = None) -> torch.Tensor:
        """Random start for block i's input: N(stored mean, stored var) per token / position / channel.

        Pixels (block 0) have no stored statistics: N(0, 1), the scale of processor-normalised
        pixels. `size` asks for a coarse patch map (per-position moments average-pooled to that
        grid). ``i = -1``: the tokens entering the pre-layernorm ("pre_ln_input" statistics)."""
        shape = self.blocks.input_shape(2 if i == -1 else i)
        key = "pre_ln_input" if i == -1 else self.input_key(i)
        if key is None:
            noise = torch.randn(batch, *shape, generator=generator)
            return noise.to(self.device, self.dtype)
        mean, var = (t.cpu().float() for t in self.moments(key))
        if i == 1:
            size = size or self.blocks.grid
            shape = (shape[0], size, size)
            if key == "patch_channel":
                mean, var = mean.view(1, -1, 1, 1), var.view(1, -1, 1, 1)
            else:
                g = self.blocks.grid
                mean, var = mean.view(1, 1, g, g), var.view(1, 1, g, g)
                if size != g:
                    mean, var = F.adaptive_avg_pool2d(mean, size), F.adaptive_avg_pool2d(var, size)
        else:
            mean, var = mean.view(1, -1, 1), var.view(1, -1, 1)
        noise = torch.randn(batch, *shape, generator=generator)
        return (mean + var.sqrt() * noise).to(self.device, self.dtype)

    @torch.no_grad()
    def variance_ratio(self, i: int, z: torch.Tensor) -> dict[str, float]:
        """Mean variance of a solved input of block i (per token / position / channel over the batch,
        as stored) next to the real data's at that block: the per-layer diagnostic of inversion-notes.md."""
        key = self.input_key(i)
        _, var = token_moments(z.flatten(2) if key == "patch_channel" else z)
        real = self.moments(key)[1]
        return {"solved": var.mean().item(), "real": real.mean().item()}

    def to_image(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] at any size -> processor-normalised pixels at the model's image size."""
        mean = torch.tensor(CLIP_MEAN, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)
        return (_up(pixels01, self.blocks.embeddings.image_size) - mean) / std


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
        self.block_variance: dict[str, dict[str, float]] = {}

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


def _adam_loop(objective_fn, z, steps, lr, tracker, stage, cost, keep_best, t_max=None, curve=None, project=None):
    """Minimise objective_fn(z) over z with Adam (cosine schedule of period `t_max` if given; `project`
    applied to z after each step); returns (best or last z, its loss)."""
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t_max)) if t_max is not None else None
    best_loss, best = math.inf, z.detach().clone()
    t_stage = time.perf_counter()
    for _ in range(steps):
        loss = objective_fn(z)
        (grad,) = torch.autograd.grad(loss, z)
        value = loss.item()
        if value < best_loss:
            best_loss, best = value, z.detach().clone()
        z.grad = grad
        opt.step()
        if project is not None:
            with torch.no_grad():
                z.copy_(project(z))
        if sched is not None:
            sched.step()
        tracker.step(stage, cost, value)
        if curve is not None:
            curve.append((tracker.passes, tracker.seconds, value))
    tracker.stage_seconds[stage] = tracker.stage_seconds.get(stage, 0.0) + time.perf_counter() - t_stage
    tracker.stage_loss[stage] = min(tracker.stage_loss.get(stage, math.inf), best_loss)
    if not keep_best and steps > 0:  # return the last iterate, with its loss (a forward for the report only)
        best = z.detach().clone()
        with torch.no_grad():
            best_loss = objective_fn(best).item()
    return best, best_loss


def _coarse_to_fine(loss_fn, z, full_size, steps, upsample_at, lr, tracker, stage, cost, keep_best,
                    t_max=None, curve=None, project=None):
    """Optimise a coarse map `z` through ``loss_fn(coarse)`` (which up-samples it itself); `z` is
    up-sampled x2 (capped at `full_size`) with a fresh Adam (and schedule) at each of `upsample_at`.
    Returns (the map at the last size, its loss)."""
    bounds = [s for s in sorted(upsample_at) if 0 < s < steps] + [steps]
    best_loss, best, done = math.inf, z, 0
    for end in bounds:
        if done > 0 and z.shape[-1] < full_size:  # the stage boundary: grow the variable
            z = _up(z.detach(), min(2 * z.shape[-1], full_size))
        z, loss = _adam_loop(loss_fn, z, end - done, lr, tracker, stage, cost, keep_best, t_max, curve, project)
        if loss < best_loss or not keep_best:
            best_loss, best = loss, z
        done = end
    return best, best_loss


def _refine(obj: _Objective, x0, targets, config: InversionConfig, tracker, start: int, cost: float):
    """Full-model refinement of the per-layer result in chunks of ``refine_batch_size``. Returns the
    samples, per chunk (size, loss, curve) with curves relative to the refinement's start."""
    size = config.refine_batch_size or x0.shape[0]
    out, chunks = [], []
    keep = config.keep_best == "all"
    t_max = config.refine_t_max or config.refine_steps
    for x, t in zip(x0.split(size), targets.split(size)):
        mark, curve = (tracker.passes, tracker.seconds), []
        x, loss = _adam_loop(lambda v, t=t: obj.full_loss(start, v, t), x, config.refine_steps, config.refine_lr,
                             tracker, "refine", cost, keep, t_max, curve)
        if config.refine_steps == 0:  # nothing refined: report the loss of the per-layer result itself
            with torch.no_grad():
                loss = obj.full_loss(start, x, t).item()
        out.append(x)
        chunks.append((t.shape[0], loss, [(p - mark[0], s - mark[1], v) for p, s, v in curve]))
    return torch.cat(out), chunks


def _per_layer(obj: _Objective, targets, config: InversionConfig, generator, tracker):
    """The per-layer stage: blocks from the post block down to ``start_block``, one at a time."""
    blocks, costs = obj.blocks, obj.blocks.block_costs()
    start, last = config.start_block, blocks.num_blocks - 1
    keep_layers = config.keep_best in ("all", "layers")
    z_next = targets
    for i in range(last, start - 1, -1):
        target_i = z_next.detach()
        if i == 1:
            g = blocks.grid
            coarse = obj.sample_input(1, target_i.shape[0], generator, size=min(config.coarse_size, g))
            z_next, _ = _coarse_to_fine(
                lambda v, t=target_i: obj.block_loss(1, _up(v, g), t, coarse=v), coarse, g, config.first_block_steps,
                config.upsample_at, config.layer_lr, tracker, "block1", costs[1], config.keep_best == "all",
            )
            z_next = _up(z_next, g).detach()
        elif i == 2 and start <= 1 and config.first_layer_in_ln_range:
            u, _ = _adam_loop(
                lambda v, t=target_i: obj.first_layer_loss(v, t), obj.sample_input(-1, target_i.shape[0], generator),
                config.layer_steps, config.layer_lr, tracker, "block2", costs[1] + costs[2], keep_layers,
            )
            with torch.no_grad():
                z_next = obj.pre_ln(u)
        else:
            z_next, _ = _adam_loop(
                lambda v, i=i, t=target_i: obj.block_loss(i, v, t), obj.sample_input(i, target_i.shape[0], generator),
                config.layer_steps, config.layer_lr, tracker, f"block{i}", costs[i], keep_layers,
            )
        if obj.input_key(i) is not None:  # pixels have no stored statistics to compare with
            tracker.block_variance[f"block{i}"] = obj.variance_ratio(i, z_next)
    return z_next


def _full_from_pixels(obj: _Objective, targets, config: InversionConfig, generator, tracker):
    """The reference's full-model path: pixels in [0, 1] from uniform noise at a coarse size,
    up-sampled before each forward, doubled at `upsample_at`, clamped after each step."""
    size = obj.blocks.embeddings.image_size
    coarse = max(2, round(size * REFERENCE_PIXEL_START))
    x = torch.rand(targets.shape[0], 3, coarse, coarse, generator=generator).to(obj.device, obj.dtype)
    curve: list = []
    x, loss = _coarse_to_fine(
        lambda v: obj.full_loss(0, obj.to_image(v), targets, tv_input=v), x, size, config.full_steps, config.upsample_at,
        config.full_lr, tracker, "full", 1.0, config.keep_best == "all", config.full_t_max or config.full_steps,
        curve, project=lambda v: v.clamp(0, 1),
    )
    with torch.no_grad():
        x = obj.to_image(x)
        if config.start_block == 1:  # replay enters after the (frozen, exact) patch embedding
            x = obj.blocks.patch_embed(x)
    return x, [(targets.shape[0], loss, curve)]


def _invert_chunk(obj: _Objective, targets: torch.Tensor, config: InversionConfig, generator, progress: bool):
    """One per-layer batch: returns samples, [(size, loss, curve)] per refinement chunk, the tracker and
    the (passes, seconds) spent before the refinement."""
    blocks = obj.blocks
    start = config.start_block
    costs = blocks.block_costs()
    if config.mode == "pmi":
        refine_chunks = math.ceil(targets.shape[0] / (config.refine_batch_size or targets.shape[0]))
        total = sum(config.first_block_steps if i == 1 else config.layer_steps for i in range(start, blocks.num_blocks))
        total += config.refine_steps * refine_chunks
    else:
        total = config.full_steps
    tracker = _Tracker(total, progress, desc=f"inversion ({config.mode})")
    try:
        if config.mode == "full" and config.full_space == "pixel":
            x, chunks = _full_from_pixels(obj, targets, config, generator, tracker)
            return x, chunks, tracker, (0.0, 0.0)
        if config.mode == "pmi":
            x0 = _per_layer(obj, targets, config, generator, tracker)
            before = (tracker.passes, tracker.seconds)
            x, chunks = _refine(obj, x0, targets, config, tracker, start, sum(costs[start:]))
            return x, chunks, tracker, before
        x0 = obj.sample_input(start, targets.shape[0], generator)
        curve: list = []
        x, loss = _adam_loop(lambda v: obj.full_loss(start, v, targets), x0, config.full_steps, config.full_lr, tracker,
                             "full", sum(costs[start:]), config.keep_best == "all",
                             config.full_t_max or config.full_steps, curve)
        return x, [(targets.shape[0], loss, curve)], tracker, (0.0, 0.0)
    finally:
        tracker.close()


def invert(
    model: nn.Module,
    targets: torch.Tensor,
    stats: LayerStatistics,
    config: InversionConfig | None = None,
    progress: bool = True,
) -> InversionResult:
    """Invert target image features ``(B, P)`` to inputs of ``config.start_block``.

    ``mode="pmi"``: blocks from the last one down to ``start_block`` are inverted one at a time
    (each from a sample of its stored input moments; block 1 coarse-to-fine), then the whole tower is
    refined. ``mode="full"``: the refinement alone, from a random start (patch maps or, with
    ``full_space="pixel"``, the reference's pixel path). Targets are processed in per-layer chunks of
    ``config.batch_size``, refined in chunks of ``config.refine_batch_size``. The model is put in eval
    mode and its parameters get no gradients; both are restored afterwards.

    The report holds: ``mode``, ``start_block``, ``num_targets``, ``num_chunks``, ``steps`` (per
    stage and chunk: ``block{i}``, ``refine`` (per refinement chunk) or ``full``), ``stage_passes``, ``stage_seconds``,
    ``stage_loss`` (best loss of each stage's own objective, mean over chunks), ``block_variance``
    (per block of the per-layer stage: mean variance of its solved input, ``solved``, and of the real
    input, ``real``, by the stored statistics), ``start_loss`` (the
    full-model objective of the refinement's start, mode "pmi"), ``full_model_passes`` (see the
    module docstring), ``seconds``, ``final_loss`` (the refinement objective of the returned
    samples, mean over chunks weighted by size), ``final_feature_mse`` and ``curve``: ``(passes,
    seconds, loss)`` at every refinement step (every step in mode "full"), passes and seconds
    cumulated over all chunks brought to that step (per-layer stages included), loss their weighted mean.
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
    samples, chunks, trackers, befores = [], [], [], []
    t0 = time.perf_counter()
    with eval_mode(model), frozen_parameters(model), torch.enable_grad():
        for chunk in targets.split(config.batch_size):
            x, refined, tracker, before = _invert_chunk(obj, chunk, config, generator, progress)
            samples.append(x)
            chunks.append(refined)
            trackers.append(tracker)
            befores.append(before)
        samples = torch.cat(samples)
        with torch.no_grad():
            out = torch.cat([blocks.forward_from(config.start_block, s) for s in samples.split(config.batch_size)])
            final_mse = feature_mse(out, targets, config.normalize_features).item()
    seconds = time.perf_counter() - t0

    n = targets.shape[0]
    pieces = [piece for refined in chunks for piece in refined]
    length = min(len(c) for _, _, c in pieces)
    curve = []
    for j in range(length):  # every chunk's per-layer stage plus every refinement chunk up to step j
        curve.append((
            sum(b[0] for b in befores) + sum(c[j][0] for _, _, c in pieces),
            sum(b[1] for b in befores) + sum(c[j][1] for _, _, c in pieces),
            sum(size * c[j][2] for size, _, c in pieces) / n,
        ))
    steps: dict[str, int] = {}
    stage_passes: dict[str, float] = {}
    stage_seconds: dict[str, float] = {}
    stage_loss: dict[str, float] = {}
    block_variance: dict[str, dict[str, float]] = {}
    for refined, tr in zip(chunks, trackers):
        for k, v in tr.block_variance.items():
            block_variance.setdefault(k, {"solved": 0.0, "real": v["real"]})["solved"] += v["solved"] / len(trackers)
        b = sum(size for size, _, _ in refined)
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
        "num_chunks": len(chunks),
        "steps": steps,
        "stage_passes": stage_passes,
        "stage_seconds": stage_seconds,
        "stage_loss": stage_loss,
        "block_variance": block_variance,
        "full_model_passes": sum(tr.passes for tr in trackers),
        "seconds": seconds,
        "final_loss": sum(size * loss for size, loss, _ in pieces) / n,
        "final_feature_mse": final_mse,
        "curve": curve,
    }
    if config.mode == "pmi" and length:
        report["start_loss"] = sum(size * c[0][2] for size, _, c in pieces) / n
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
