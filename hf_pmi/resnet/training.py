"""The training schedule of the BatchNorm family's later tasks (the reference's gradual stages), its
augmentation and the parameter groups it unfreezes.

Reference (``RuilinTong/PMI-CFS-DFCL``, ``ResNet-32/continual_runner/task_contrastive_cl_runner.py``,
``train_single_task``; scripts ``task_cont_{cifar100,tiny}_*_task.sh``):

- the first task: SGD (momentum 0.9, weight decay 5e-4, no Nesterov) at lr 0.1 for ``max_epochs`` 200, x0.1
  at epochs 80 and 120 (`first_task_phase`: milestones at 40 % and 60 % of the epochs);
- every later task, with ``epochs='20,20,0,0,120'`` and ``lrs='1e-1,5e-2,0,0,5e-3'`` (``1e-2`` for CIFAR-100
  10 and 20 tasks): stage 0 trains the **new task's classifier alone**, the backbone frozen in eval mode, at
  a constant lr; stage k adds the k-th group of layers from the top (``stage_4``: the last residual block,
  then ``stage_3``, ``stage_2``, ``stage_1`` with the stem), each newly trainable group in train mode, and
  the relation-KD projections, with a fresh SGD whose lr drops x0.1 at 50 % and 75 % of the stage's epochs.
  The classifier rows of earlier tasks are in none of these optimisers (`later_task_phases`). With the
  reference's zero-epoch middle stages this is three phases: new rows; + the last residual block; everything.
- a later task's epochs split 20 : 20 : 120 over the three phases (`stage_epochs` scales that to any budget).

Augmentation (`augment`): per image, a random crop after zero padding (CIFAR practice: ``RandomCrop(32,
padding=4)``; the padding is zeros of the normalised tensor, the channel mean, where torchvision pads black
before normalising) and, optionally, a horizontal flip. Replayed samples are not augmented (the reference's
buffer hands them out as generated).

Example:
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> model = ResNet32ForImageClassification(ResNet32Config(num_labels=2))
    >>> [len(group) for group in training_groups(model)]  # last block, rest of stage 3, stage 2, stage 1 + stem
    [1, 4, 5, 6]
    >>> stage_epochs(160), stage_epochs(16)
    ((20, 20, 120), (2, 2, 12))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BNBlocks

# The reference's later-task stages (epochs '20,20,0,0,120'): head, + last block, (0, 0), everything.
REFERENCE_STAGE_EPOCHS = (20, 20, 120)
# Their lrs ('1e-1,5e-2,0,0,5e-3'); CIFAR-100 10 / 20 tasks end at 1e-2 (task_cont_cifar100_{10,20}_task.sh).
REFERENCE_STAGE_LRS = (0.1, 0.05, 5e-3)
LOW_LR_CIFAR_10_20 = 1e-2
# First task: max_epochs 200, milestones 80 and 120, lr_factor 0.1.
FIRST_TASK_MILESTONES = (0.4, 0.6)
# A later stage's MultiStepLR: int(epochs * 0.5), int(epochs * 0.75), gamma 0.1 (build_optimizer).
STAGE_MILESTONES = (0.5, 0.75)
LR_FACTOR = 0.1


@dataclass
class Phase:
    """One optimiser's run: ``groups`` the modules trained (None: the whole model), ``new_rows_only``: the head's
    rows of earlier classes are kept bit for bit, ``rkd``: the relation-KD term and projections take part,
    ``milestones``: fractions of the epochs where the lr drops x0.1 (empty: constant), or ``"one_cycle"``."""

    name: str
    epochs: int
    lr: float
    groups: list[nn.Module] | None
    new_rows_only: bool
    rkd: bool
    milestones: tuple[float, ...] | str = ()
    nesterov: bool = False


def _last_stage(model: nn.Module) -> list[nn.Module]:
    blocks = BNBlocks(model)
    return list(blocks.modules[1:][sum(blocks.stage_sizes[:-1]):])


def training_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The modules the reference unfreezes stage by stage, from the top: the last residual block; the other
    blocks of the last stage (if any); every earlier stage, the first with the stem."""
    blocks = BNBlocks(model)
    residual = blocks.modules[1:]
    stages, start = [], 0
    for size in blocks.stage_sizes:
        stages.append(residual[start:start + size])
        start += size
    stages = [s for s in stages if s]
    groups = [[stages[-1][-1]]]
    if len(stages[-1]) > 1:
        groups.append(list(stages[-1][:-1]))
    for s in reversed(stages[:-1]):
        groups.append(list(s))
    groups[-1] = [blocks.modules[0], *groups[-1]]  # the stem joins the bottom stage (reference: conv_1_3x3, bn_1)
    return groups


def stage_epochs(later_epochs: int) -> tuple[int, int, int]:
    """The reference's 20 : 20 : 120 split of a later task's epochs over (new rows, + last block, everything)."""
    total = sum(REFERENCE_STAGE_EPOCHS)
    head = round(later_epochs * REFERENCE_STAGE_EPOCHS[0] / total)
    top = round(later_epochs * REFERENCE_STAGE_EPOCHS[1] / total)
    return head, top, later_epochs - head - top


def first_task_phase(epochs: int, lr: float, schedule: str) -> list[Phase]:
    if schedule == "one_cycle":
        return [Phase("all", epochs, lr, None, False, False, "one_cycle", nesterov=True)]
    return [Phase("all", epochs, lr, None, False, False, FIRST_TASK_MILESTONES)]


def later_task_phases(model: nn.Module, schedule: str, epochs: tuple[int, int, int] | int, lrs: tuple[float, ...],
                      one_cycle_lr: float, last_stage: str = "block") -> list[Phase]:
    """The phases of a later task: the reference's stages, or (``"one_cycle"``, hf_pmi before issue 30) one
    one-cycle run over every parameter, old rows included. The second stage adds the last residual block
    (``last_stage="block"``, PODNet's ``stage_4``) or every block of the last stage (``"stage"``)."""
    if schedule == "one_cycle":
        return [Phase("all", int(epochs if isinstance(epochs, int) else sum(epochs)), one_cycle_lr, None, False, True,
                      "one_cycle", nesterov=True)]
    groups = training_groups(model)
    e_head, e_top, e_all = epochs
    return [
        Phase("new_rows", e_head, lrs[0], [], True, False),  # train_head: no scheduler step, constant lr
        Phase("last_block", e_top, lrs[1], groups[0] if last_stage == "block" else _last_stage(model), True, True,
              STAGE_MILESTONES),
        Phase("everything", e_all, lrs[2], None, True, True, STAGE_MILESTONES),
    ]


def set_phase_modes(model: nn.Module, phase: Phase) -> list[tuple[nn.Parameter, bool]]:
    """Gradients for the phase's modules and the head only, and their modes (`apply_phase_modes`); returns the
    flags to restore."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if phase.groups is not None:
        model.requires_grad_(False)
        for module in phase.groups:
            module.requires_grad_(True)
        from .heads import classifier_layer

        classifier_layer(model).requires_grad_(True)
    apply_phase_modes(model, phase)
    return flags


def apply_phase_modes(model: nn.Module, phase: Phase) -> None:
    """Train mode for the phase's modules only (the rest, frozen, in eval mode); the whole model for ``groups=None``."""
    if phase.groups is None:
        model.train()
        return
    model.eval()
    for module in phase.groups:
        module.train()


def restore_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def augment(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator,
            fill: tuple[float, ...] | None = None) -> torch.Tensor:
    """Per image: a random ``H x W`` crop of the image padded with `fill` per channel (None: zeros), then
    (``flip``) a horizontal flip with probability 0.5.

    Example:
        >>> x = torch.ones(4, 2, 2, 2)
        >>> g = torch.Generator().manual_seed(1)
        >>> sorted(set(augment(x, 1, False, g, fill=(-1.0, -2.0)).flatten().tolist()))  # the padding shows
        [-2.0, -1.0, 1.0]
    """
    n, c, h, w = x.shape
    if padding > 0:
        if fill is None:
            padded = F.pad(x, (padding,) * 4)
        else:
            padded = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1).repeat(
                n, 1, h + 2 * padding, w + 2 * padding)
            padded[:, :, padding:padding + h, padding:padding + w] = x
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)  # (n, h)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)  # (n, w)
        index = torch.arange(n, device=x.device).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[index, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(-1), x)
    return x.contiguous()
