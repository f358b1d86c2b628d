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
from typing import ClassVar

import torch
import torch.nn.functional as F

from .validation import require_count, require_weight


@dataclass
class ReplayConfig:
    """Replay training settings (flags ``--replay_<field>``); reference values for CLIP (method.md)."""

    flag_prefix: ClassVar[str] = "replay_"
    argument_group: ClassVar[str] = "replay training (ReplayConfig)"

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
    grid_samples: int = field(
        default=64, metadata={"help": "Replayed samples rendered to `task-{t}/replay_samples.png` (0: no grid)."}
    )

    def __post_init__(self):
        p = self.flag_prefix
        require_count(p + "batch_size", self.batch_size,
                      meaning=": every real batch is joined by this many replayed samples (a method without replay, "
                              "e.g. --method finetune, trains without them)")
        for name in ("l_ce", "l_hkd", "l_tkd", "l_ft"):
            require_weight(p + name, getattr(self, name))
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
) -> dict[str, torch.Tensor]:
    """The four terms for one batch (already weighted; their sum is the loss).

    ``out`` is the student's `ContinualCLIPOutput` for real images plus replayed samples;
    ``teacher_out`` the frozen teacher's for the replayed samples (``replay_logits``,
    ``text_embeds``).
    """
    s = out.logit_scale
    text = out.text_embeds
    # local CE: real data against the new classes only
    ce = F.cross_entropy(out.logits[:, n_old:], labels - n_old)
    # L1 logit KD on replayed samples, over the old classes
    hkd = (out.replay_logits[:, :n_old] - teacher_out.replay_logits[:, :n_old]).abs().mean()
    # L1 KD of the old classes' text features
    tkd = (text[:n_old] - teacher_out.text_embeds[:n_old]).abs().mean()
    # balancing CE over all seen classes; with detached image features it trains the text side only
    replay_img, img = out.replay_image_embeds, out.image_embeds
    if ft_detach:
        replay_img, img = replay_img.detach(), img.detach()
    ft = F.cross_entropy(s * replay_img @ text.t(), replay_labels) + F.cross_entropy(s * img @ text.t(), labels)
    return {"ce": weights["ce"] * ce, "hkd": weights["hkd"] * hkd, "tkd": weights["tkd"] * tkd, "ft": l_ft * ft}
