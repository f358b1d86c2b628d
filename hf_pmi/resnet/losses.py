"""The replay losses of the reference's ResNet path (R-DFCIL's, plus PMI's balancing term), as pure functions.

Training task t on its real images x (labels y) with replayed samples x~ (labels y~) of the n_old
earlier classes and the frozen model of task t-1 as teacher:

- **local CE** on real data over the new classes only: CE(logits[:, n_old:], y - n_old);
- **hard KD** (L1) on replayed samples: | logits(x~)[:, :n_old] - teacher_logits(x~) |;
- **relation KD** on real data: both pooled features projected to 2D (D the feature size) by two
  trained linear maps (one for the student, one for the teacher), then the L1 distance between the
  angle matrices of all triplets of the batch (`RelationKD`);
- **balancing CE** (PMI): CE over all seen classes of the classifier on *detached* features of real
  and replayed samples (it trains the head only).

Task weights (R-DFCIL): alpha = log2(n_new / 2 + 1), beta = sqrt(n_old / n_new);
w_ce = l_ce (1 + 1/alpha) / beta, w_ft = l_ft (1 + 1/alpha) / beta, w_hkd = l_hkd alpha beta,
w_rkd = l_rkd alpha beta. Defaults: the reference's ResNet scripts (CIFAR-100 5 / 10 tasks:
l_ce 0.75, l_hkd 0.15, l_rkd 0.5, l_ft 1.5; 20 tasks l_ft 1.0). R-DFCIL itself: l_ce 0.5,
l_hkd 0.15, l_rkd 0.5 and no balancing term (`RDFCIL_WEIGHTS`).

The reference computes ``hkd + rkd * l_rkd * ft * l_ft`` (a product); R-DFCIL adds its terms, and so
does hf_pmi by default (method.md); `total_loss` has both forms.

After the main epochs, both references fine-tune the head alone with a class-balanced CE on real
plus replayed samples and the hard KD (`finetune_losses`, `class_balance_weights`).

Example:
    >>> w = task_weights(n_old=8, n_new=2)
    >>> round(w["ce"], 4), round(w["hkd"], 4), round(w["rkd"], 4), round(w["ft"], 4)
    (0.75, 0.3, 1.0, 1.5)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The reference ResNet scripts (PMI, CIFAR-100 / Tiny-ImageNet, 5 and 10 tasks; l_ft 1.0 for 20 tasks).
PMI_RESNET_WEIGHTS = {"l_ce": 0.75, "l_hkd": 0.15, "l_rkd": 0.5, "l_ft": 1.5}
# R-DFCIL's configs (no balancing term during training; its head fine-tuning comes after).
RDFCIL_WEIGHTS = {"l_ce": 0.5, "l_hkd": 0.15, "l_rkd": 0.5, "l_ft": 0.0}


def task_weights(n_old: int, n_new: int, l_ce: float = 0.75, l_hkd: float = 0.15, l_rkd: float = 0.5,
                 l_ft: float = 1.5) -> dict[str, float]:
    """R-DFCIL's task-dependent weights of the four terms (see the module docstring)."""
    if n_old <= 0 or n_new <= 0:
        raise ValueError(f"Task weights need old and new classes, got n_old={n_old}, n_new={n_new}.")
    alpha = math.log2(n_new / 2 + 1)
    beta = math.sqrt(n_old / n_new)
    return {"ce": l_ce * (1 + 1 / alpha) / beta, "hkd": l_hkd * alpha * beta, "rkd": l_rkd * alpha * beta,
            "ft": l_ft * (1 + 1 / alpha) / beta}


def local_ce(logits: torch.Tensor, labels: torch.Tensor, n_old: int) -> torch.Tensor:
    """CE over the new classes only (labels are global ids >= n_old).

    Example:
        >>> logits = torch.tensor([[9.0, 0.0, 2.0]])
        >>> round(local_ce(logits, torch.tensor([2]), n_old=1).item(), 4)  # the old class's 9.0 does not count
        0.1269
    """
    return F.cross_entropy(logits[:, n_old:], labels - n_old)


def hard_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """L1 between the student's old-class logits and the teacher's (the teacher's columns decide n_old)."""
    return (student_logits[:, : teacher_logits.shape[1]] - teacher_logits).abs().mean()


def _angles(e: torch.Tensor) -> torch.Tensor:
    d = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # (N, N, P): unit vectors e_j - e_i
    return torch.bmm(d, d.transpose(1, 2)).flatten()  # cos of the angle at i between j and k


class RelationKD(nn.Module):
    """Angle-wise relation distillation with trained projections (R-DFCIL's RKD): student and teacher
    features ``(N, D)`` are mapped to ``proj_dim`` (default 2D) by their own linear layer, and the L1
    distance between their triplet-angle matrices is the loss. Its parameters belong in the optimiser.

    Example:
        >>> rkd = RelationKD(4)
        >>> f = torch.randn(5, 4)
        >>> rkd.student.load_state_dict(rkd.teacher.state_dict())
        <All keys matched successfully>
        >>> float(rkd(f, f).detach())
        0.0
    """

    def __init__(self, dim: int, proj_dim: int | None = None):
        super().__init__()
        proj_dim = proj_dim or 2 * dim  # reference: twice the feature size
        self.student = nn.Linear(dim, proj_dim)
        self.teacher = nn.Linear(dim, proj_dim)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(_angles(self.student(student_features)), _angles(self.teacher(teacher_features)))


def balancing_ce(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                 replay_features: torch.Tensor, replay_labels: torch.Tensor,
                 class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """CE over all seen classes of `classifier` on the detached features of real and replayed samples."""
    logits = classifier(torch.cat([features.detach(), replay_features.detach()]))
    return F.cross_entropy(logits, torch.cat([labels, replay_labels]), weight=class_weights)


def replay_losses(
    logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor, teacher_features: torch.Tensor,
    replay_logits: torch.Tensor, replay_labels: torch.Tensor, replay_features: torch.Tensor,
    teacher_replay_logits: torch.Tensor, classifier: nn.Module, rkd: RelationKD, n_old: int,
    weights: dict[str, float],
) -> dict[str, torch.Tensor]:
    """The four weighted terms for one batch; the loss is their **sum**.

    ``logits`` / ``features``: the student on the real batch; ``teacher_features``: the teacher's
    pooled features of the same real batch; ``replay_*``: the student on the replayed batch;
    ``teacher_replay_logits``: the teacher's logits on it (old classes).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> head, rkd = nn.Linear(4, 3, bias=False), RelationKD(4)
        >>> f, fr = torch.randn(6, 4), torch.randn(6, 4)
        >>> terms = replay_losses(head(f), torch.tensor([2] * 6), f, f, head(fr), torch.tensor([0, 1] * 3), fr,
        ...                       head(fr)[:, :2].detach(), head, rkd, n_old=2, weights=task_weights(2, 1))
        >>> sorted(terms), float(terms["hkd"].detach())
        (['ce', 'ft', 'hkd', 'rkd'], 0.0)
    """
    return {
        "ce": weights["ce"] * local_ce(logits, labels, n_old),
        "hkd": weights["hkd"] * hard_kd(replay_logits, teacher_replay_logits[:, :n_old]),
        "rkd": weights["rkd"] * rkd(features, teacher_features),
        "ft": weights["ft"] * balancing_ce(classifier, features, labels, replay_features, replay_labels),
    }


def total_loss(terms: dict[str, torch.Tensor], form: str = "sum") -> torch.Tensor:
    """The loss of a batch from its weighted terms: their ``"sum"`` (R-DFCIL), or the reference's ``"product"``
    form, ``ce + hkd + rkd * ft`` (``ce + hkd * ft`` in the new-rows stage, which has no relation KD).

    Example:
        >>> terms = {"ce": torch.tensor(1.0), "hkd": torch.tensor(2.0), "rkd": torch.tensor(3.0), "ft": torch.tensor(4.0)}
        >>> float(total_loss(terms)), float(total_loss(terms, "product"))
        (10.0, 15.0)
    """
    if form == "sum":
        return sum(terms.values())
    if "rkd" in terms:
        return terms["ce"] + terms["hkd"] + terms["rkd"] * terms["ft"]
    return terms["ce"] + terms["hkd"] * terms["ft"]


def class_balance_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-class CE weights from the number of times each class was seen in training: inverse
    frequency, scaled so that the most frequent class weighs 1 (R-DFCIL, and the reference).

    Example:
        >>> class_balance_weights(torch.tensor([100.0, 50.0, 0.0])).tolist()
        [1.0, 2.0, 100.0]
    """
    w = counts.sum() / counts.clamp(min=1)
    return w / w.min()


def finetune_losses(logits: torch.Tensor, labels: torch.Tensor, replay_logits: torch.Tensor,
                    replay_labels: torch.Tensor, teacher_replay_logits: torch.Tensor, n_old: int,
                    class_weights: torch.Tensor, l_ce: float = 0.75, w_hkd: float = 0.0) -> dict[str, torch.Tensor]:
    """The head fine-tuning after the main epochs: class-balanced CE over all seen classes on real
    plus replayed samples (weight ``l_ce``, not task-scaled) and the hard KD with the task's hkd
    weight (`task_weights`' "hkd"). Only the classifier should be trainable then."""
    ce = F.cross_entropy(torch.cat([logits, replay_logits]), torch.cat([labels, replay_labels]), weight=class_weights)
    return {"ce": l_ce * ce, "hkd": w_hkd * hard_kd(replay_logits, teacher_replay_logits[:, :n_old])}
