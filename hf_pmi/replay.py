"""Replay training: its settings (`ReplayConfig`) and losses for task t+1 on real new-class data plus
replayed old-class samples.

Follows method.md ("Training task t+1"), with the R-DFCIL task weights:
``alpha = log2(n_new / 2 + 1)``, ``beta = sqrt(n_old / n_new)``,
``w_ce = l_ce * (1 + 1/alpha) / beta``, ``w_hkd = l_hkd * alpha * beta``, ``w_tkd = l_tkd * alpha * beta``.

Example:
    >>> w = task_weights(n_old=2, n_new=2, l_ce=1.0, l_hkd=0.1, l_tkd=0.2)
    >>> round(w["ce"], 3), round(w["hkd"], 3), round(w["tkd"], 3)
    (2.0, 0.1, 0.2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .contrastive import apply_preset
from .validation import require, require_count, require_positive, require_weight

TEACHER_TEXTS = ("teacher", "student")
STATISTICS_MODELS = ("current", "previous")

# The reference's replay path (moe_adapter.py with prv_ft 0) where hf_pmi's defaults differ, as the values of
# those settings. `ReplayConfig(preset="reference")` applies them to every field left at its default.
REFERENCE_PRESET: dict[str, Any] = {
    "teacher_text": "student",  # the teacher's logits over the student's old-class text features
    "statistics_model": "previous",  # layer statistics of the model before the task (task 0: the raw CLIP) ...
    "statistics_crop": 0.9,  # ... on the training loader, augmented by RandomResizedCrop(scale=(0.9, 1))
    "l_fd": 0.0,  # no feature distillation (hf_pmi's, for a classifier head: docs/benchmarks.md "Heads") ...
    "l_fd_real": 0.0,
    "later_lr_scale": 1.0,  # ... and one learning rate for every task
}
PRESETS = {"reference": REFERENCE_PRESET}


@dataclass
class ReplayConfig:
    """Replay training settings (flags ``--replay_<field>``); reference values for CLIP (method.md), and
    ``preset="reference"`` for the reference's behaviour where hf_pmi differs (`REFERENCE_PRESET`).

    Example:
        >>> ReplayConfig().teacher_text, ReplayConfig(preset="reference").teacher_text
        ('teacher', 'student')
    """

    flag_prefix: ClassVar[str] = "replay_"
    argument_group: ClassVar[str] = "replay training (ReplayConfig)"

    preset: str = field(
        default="",
        metadata={"help": "'reference': the reference's replay path where hf_pmi differs (teacher logits over the "
                  "student's old text features; layer statistics of the previous model on cropped images); fields "
                  "given explicitly keep their value. '': hf_pmi's defaults."},
    )
    batch_size: int = field(
        default=64, metadata={"help": "Replayed samples added to every real batch, drawn with replacement (reference 64)."}
    )
    l_ce: float = field(default=1.0, metadata={"help": "Weight of the local CE on new classes (before task weighting)."})
    l_hkd: float = field(default=0.1, metadata={"help": "Weight of the L1 logit distillation on replayed samples."})
    l_tkd: float = field(default=0.2, metadata={"help": "Weight of the L1 distillation of old text features (0.1 CUB)."})
    l_ft: float = field(default=0.001, metadata={"help": "Weight of the balancing CE on detached image features (0.1 CUB)."})
    ft_detach: bool = field(
        default=True,
        metadata={"help": "Detach image features in the balancing CE (reference: True, it then trains the text side "
                  "only). False lets it also train the vision tower to tell new from old classes, which a model "
                  "without pre-trained image-text alignment (or with a frozen text tower) needs."},
    )
    teacher_text: str = field(
        default="teacher",
        metadata={"help": "Old-class text features the teacher's logits in the logit distillation are taken against: "
                  "'teacher' (its own, no gradient) or 'student' (reference, prv_ft 0: the student's, with "
                  "gradient, so the distillation also trains the text side)."},
    )
    statistics_model: str = field(
        default="current",
        metadata={"help": "Model whose activations give the bank's layer statistics of a task: 'current' (the model "
                  "just trained on it) or 'previous' (reference: the model before the task, the raw CLIP for the "
                  "first task; one more pass over the task's images). Class Gaussians always come from the current one."},
    )
    statistics_crop: float = field(
        default=1.0,
        metadata={"help": "Smallest area fraction of a random resized crop applied to each image before layer "
                  "statistics are collected (1: none; reference 0.9, its training loader's RandomResizedCrop)."},
    )
    l_fd: float = field(
        default=100.0,
        metadata={"help": "Weight of a feature distillation on replayed samples: the mean squared difference of the "
                  "pooled image features (what a classifier head reads) of the student and the teacher (reference: "
                  "0, none). It keeps old classes' features where a head's statistics were taken (benchmarks/heads.py)."},
    )
    l_fd_real: float = field(
        default=100.0,
        metadata={"help": "Weight of the same feature distillation on the task's real images (no replay needed; one "
                  "more teacher pass per step; reference: 0, none)."},
    )
    later_lr_scale: float = field(
        default=0.1,
        metadata={"help": "The tasks that replay (every task after the first) train at --learning_rate times this "
                  "(reference: 1). A slower learner (SLCA) moves the old classes' features less, so a classifier "
                  "head's statistics stay valid (benchmarks/heads.py)."},
    )
    head_drift: bool = field(
        default=True,
        metadata={"help": "Before a task's classes join a classifier head (`--head ncm|ranpac`), move the old classes' "
                  "statistics by the mean displacement of their replay samples' pooled features from the teacher to "
                  "the trained model (drift compensation). False: statistics stay as they were taken."},
    )
    grid_samples: int = field(
        default=64, metadata={"help": "Replayed samples rendered to `task-{t}/replay_samples.png` (0: no grid)."}
    )

    def __post_init__(self):
        apply_preset(self, PRESETS)
        p = self.flag_prefix
        require(self.teacher_text in TEACHER_TEXTS, p + "teacher_text", self.teacher_text, f"one of {list(TEACHER_TEXTS)}")
        require(self.statistics_model in STATISTICS_MODELS, p + "statistics_model", self.statistics_model,
                f"one of {list(STATISTICS_MODELS)}")
        require(isinstance(self.statistics_crop, (int, float)) and 0 < self.statistics_crop <= 1,
                p + "statistics_crop", self.statistics_crop, "in (0, 1] (an area fraction; 1: no crop)")
        require_count(p + "batch_size", self.batch_size,
                      meaning=": every real batch is joined by this many replayed samples (a method without replay, "
                              "e.g. --method finetune, trains without them)")
        for name in ("l_ce", "l_hkd", "l_tkd", "l_ft", "l_fd", "l_fd_real"):
            require_weight(p + name, getattr(self, name))
        require_positive(p + "later_lr_scale", self.later_lr_scale, " (a factor of --learning_rate)")
        require_count(p + "grid_samples", self.grid_samples, minimum=0, meaning=" (0: no grid)")


def task_weights(n_old: int, n_new: int, l_ce: float, l_hkd: float, l_tkd: float) -> dict[str, float]:
    """R-DFCIL's task-dependent weights of the local CE and the two distillation terms."""
    if n_old <= 0 or n_new <= 0:
        raise ValueError(f"Task weights need old and new classes, got n_old={n_old}, n_new={n_new}.")
    alpha = math.log2(n_new / 2 + 1)
    beta = math.sqrt(n_old / n_new)
    return {"ce": l_ce * (1 + 1 / alpha) / beta, "hkd": l_hkd * alpha * beta, "tkd": l_tkd * alpha * beta}


def replay_losses(
    out,
    teacher_out,
    labels: torch.Tensor,
    replay_labels: torch.Tensor,
    n_old: int,
    weights: dict[str, float],
    l_ft: float,
    ft_detach: bool = True,
    teacher_text: str = "teacher",
    l_fd: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The four terms for one batch (already weighted; their sum is the loss), and with ``l_fd > 0`` a fifth:
    the mean squared difference of the student's and the teacher's pooled features of the replayed samples.

    ``out`` is the student's `ContinualCLIPOutput` for real images plus replayed samples;
    ``teacher_out`` the frozen teacher's for the replayed samples (``replay_logits``,
    ``replay_image_embeds``, ``text_embeds``). `teacher_text` says which old-class text features the
    teacher's logits are taken against: ``"teacher"`` (its own, ``teacher_out.replay_logits``) or
    ``"student"`` (the reference with prv_ft 0: ``s * teacher_image @ T_student_old``, gradient
    reaching the student's text features).
    """
    s = out.logit_scale
    text = out.text_embeds
    # local CE: real data against the new classes only
    ce = F.cross_entropy(out.logits[:, n_old:], labels - n_old)
    # L1 logit KD on replayed samples, over the old classes
    if teacher_text == "student":
        teacher_logits = s * teacher_out.replay_image_embeds @ text[:n_old].t()
    elif teacher_text == "teacher":
        teacher_logits = teacher_out.replay_logits[:, :n_old]
    else:
        raise ValueError(f"teacher_text must be one of {list(TEACHER_TEXTS)}, got {teacher_text!r}.")
    hkd = (out.replay_logits[:, :n_old] - teacher_logits).abs().mean()
    # L1 KD of the old classes' text features
    tkd = (text[:n_old] - teacher_out.text_embeds[:n_old]).abs().mean()
    # balancing CE over all seen classes; with detached image features it trains the text side only
    replay_img, img = out.replay_image_embeds, out.image_embeds
    if ft_detach:
        replay_img, img = replay_img.detach(), img.detach()
    ft = F.cross_entropy(s * replay_img @ text.t(), replay_labels) + F.cross_entropy(s * img @ text.t(), labels)
    terms = {"ce": weights["ce"] * ce, "hkd": weights["hkd"] * hkd, "tkd": weights["tkd"] * tkd, "ft": l_ft * ft}
    if l_fd:
        terms["fd"] = l_fd * (out.replay_pooled_embeds - teacher_out.replay_pooled_embeds).pow(2).mean()
    return terms


def crop_box(height: int, width: int, scale: float, generator: torch.Generator,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop of an image `height` x `width`: area fraction uniform in
    ``[scale, 1]``, aspect ratio log-uniform in `ratio`, place uniform; after 10 draws that do not fit,
    the whole image (torchvision's ``RandomResizedCrop.get_params``, its fallback simplified)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = height * width * (scale + (1 - scale) * torch.rand(1, generator=generator).item())
        r = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=generator).item())
        w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,), generator=generator))
            left = int(torch.randint(width - w + 1, (1,), generator=generator))
            return top, left, h, w
    return 0, 0, height, width


def random_resized_crop(pixels: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Each image of `pixels` (B, C, H, W) cropped to its own `crop_box` and resized back to (H, W)
    (bilinear, antialiased): torchvision's ``RandomResizedCrop(scale=(scale, 1))``. ``scale >= 1``
    returns `pixels` unchanged.

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> torch.equal(random_resized_crop(x, 1.0, torch.Generator()), x)
        True
        >>> tuple(random_resized_crop(x, 0.5, torch.Generator().manual_seed(0)).shape)
        (1, 1, 4, 4)
    """
    if scale >= 1:
        return pixels
    _, _, height, width = pixels.shape
    out = []
    for image in pixels:
        top, left, h, w = crop_box(height, width, scale, generator)
        crop = image[None, :, top:top + h, left:left + w]
        out.append(crop if (h, w) == (height, width) else
                   F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out)


def cropped_batches(batches, scale: float, seed: int):
    """``(pixels, labels)`` batches with `random_resized_crop` applied to the pixels (``statistics_crop``;
    the generator is seeded with `seed`, so the crops are the same on every call)."""
    generator = torch.Generator().manual_seed(seed)
    for pixels, labels in batches:
        yield random_resized_crop(pixels, scale, generator), labels
