"""`InversionConfig`: the settings of one inversion (method.md, steps 5-6), validated where they are made.

The defaults are the reference's CLIP settings except where a field says "beyond the reference";
``preset="reference"`` gives the reference's CLIP inversion as a whole (`REFERENCE_PRESET`). What
to invert toward (the targets drawn from the feature bank) is set by `hf_pmi.bank.SamplingConfig`
and `hf_pmi.contrastive.SelectionConfig`; which inversion runs (per-layer then refinement, or a
random start) is the method's choice (`invert(..., mode=...)`).

Example:
    >>> InversionConfig(preset="reference").tv, InversionConfig().tv
    ('norm', 'squared')
    >>> InversionConfig(preset="reference", refine_batch_size=10).refine_batch_size  # a non-default value wins
    10
    >>> InversionConfig(layer_steps=0)
    Traceback (most recent call last):
    ...
    hf_pmi.validation.ValidationError: inversion_layer_steps=0 is invalid: it must be an integer >= 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..validation import ValidationError, require, require_count, require_positive, require_weight

MODES = ("pmi", "full", "refresh")  # per-layer stage + refinement; refinement from a random start; from given inputs

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
_CHOICES = {"preset": ("", *PRESETS), "patch_stats": ("position", "channel"), "keep_best": ("all", "layers"),
            "tv": ("squared", "norm"), "full_space": ("patch", "pixel")}


@dataclass
class InversionConfig:
    """Settings of `hf_pmi.inversion.invert` (flags ``--inversion_<field>``). A field given explicitly
    at hf_pmi's default value cannot be told from one left alone: a preset sets it."""

    flag_prefix: ClassVar[str] = "inversion_"
    argument_group: ClassVar[str] = "inversion (InversionConfig)"

    preset: str = field(
        default="",
        metadata={"help": "'reference': every setting that differs from the reference CLIP inversion is set to the "
                  "reference's behaviour (fields given explicitly keep their value). '': hf_pmi's defaults."},
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
    # ----- random start (mode "full", the DeepInversion-style baseline)
    full_steps: int | None = field(
        default=None,
        metadata={"help": "Full-model steps from a random start (mode 'full'). Default: the full-model passes one "
                  "per-layer batch of mode 'pmi' costs with these settings, so that both spend the same compute."},
    )
    full_lr: float = field(
        default=0.03,
        metadata={"help": "Adam lr of mode 'full' (cosine). In patch space 0.03 reached a lower loss than 0.1 on the "
                  "digits benchmark (0.038 vs 0.056); the reference's pixel path uses 0.1."},
    )
    full_t_max: int = field(default=0, metadata={"help": "Cosine period of mode 'full'; 0 = full_steps (reference 2000)."})
    full_space: str = field(
        default="patch",
        metadata={"help": "Variable of mode 'full': 'patch' (patch maps from a stored-moment start, the input replay "
                  "uses) or 'pixel' (reference: pixels in [0, 1] from uniform noise at 32/224 of the image size, "
                  "bicubically up-sampled before each forward and doubled at `upsample_at`, clamped after each "
                  "step; the result is patch-embedded for replay)."},
    )
    # ----- objective details
    normalize_features: bool = field(
        default=False, metadata={"help": "Match L2-normalised features (the semantic-projection path of method.md uses this)."}
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of target sampling and random starts. Default: the run's --seed (an explicit value is kept)."},
    )

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValidationError(
                    f"{self.flag_prefix}{name} must be one of {list(allowed)}, got {getattr(self, name)!r}."
                )
        if self.preset:
            defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                        for f in dataclasses.fields(self)}
            for name, value in PRESETS[self.preset].items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        self.upsample_at = [int(s) for s in self.upsample_at]
        self.validate()

    def validate(self) -> None:
        """Raise `ValidationError` for a setting that would be silently 0 or fail late (named by its flag)."""
        p = self.flag_prefix
        require(isinstance(self.batch_size, int) and self.batch_size >= 2, p + "batch_size", self.batch_size,
                "an integer >= 2 (moments are taken over the batch)")
        require(self.refine_batch_size == 0 or self.refine_batch_size >= 2, p + "refine_batch_size",
                self.refine_batch_size, "0 (= the per-layer batch) or >= 2")
        require(self.start_block >= 0, p + "start_block", self.start_block, ">= 0")
        for name in ("layer_steps", "first_block_steps", "coarse_size"):
            require_count(p + name, getattr(self, name))
        if self.full_steps is not None:
            require_count(p + "full_steps", self.full_steps, meaning=" (or unset: the per-layer budget)")
        require_count(p + "refine_steps", self.refine_steps, minimum=0, meaning=" (0: no refinement)")
        for name in ("layer_lr", "refine_lr", "full_lr"):
            require_positive(p + name, getattr(self, name))
        for name in ("alpha_rf", "alpha_tv"):
            require_weight(p + name, getattr(self, name))
        if self.a_layer is not None:  # None: the reference's alpha_rf x number of blocks
            require_weight(p + "a_layer", self.a_layer)
        for name in ("refine_t_max", "full_t_max"):
            require_count(p + name, getattr(self, name), minimum=0, meaning=" (0: the stage's own steps)")
        bad = [s for s in self.upsample_at if not 0 < s < self.first_block_steps]
        require(not bad, p + "upsample_at", list(self.upsample_at),
                f"steps strictly between 0 and first_block_steps={self.first_block_steps}",
                "Lower them, or raise first_block_steps.")
        require(self.seed is None or isinstance(self.seed, int), p + "seed", self.seed, "an integer, or unset")

    def layer_weight(self, num_blocks: int) -> float:
        """The per-block KL weight: ``a_layer``, or the reference's alpha_rf * num_blocks."""
        return self.a_layer if self.a_layer is not None else self.alpha_rf * num_blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValidationError(f"Inversion mode must be one of {list(MODES)}, got {mode!r}.")


__all__ = ["InversionConfig", "MODES", "PRESETS", "REFERENCE_PRESET", "check_mode"]
