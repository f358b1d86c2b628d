"""The R-DFCIL-style replay losses of the ResNet path."""

import math

import pytest
import torch
from torch import nn

from hf_pmi.resnet.losses import (
    RelationKD,
    balancing_ce,
    class_balance_weights,
    finetune_losses,
    hard_kd,
    local_ce,
    replay_losses,
    task_weights,
)


def test_task_weights_follow_r_dfcil():
    w = task_weights(n_old=20, n_new=20)  # CIFAR-100 5 tasks, second task
    alpha, beta = math.log2(11), 1.0
    assert w["ce"] == pytest.approx(0.75 * (1 + 1 / alpha)) and w["ft"] == pytest.approx(1.5 * (1 + 1 / alpha))
    assert w["hkd"] == pytest.approx(0.15 * alpha) and w["rkd"] == pytest.approx(0.5 * alpha)
    later = task_weights(n_old=80, n_new=20)  # more old classes: distil harder, learn new ones more gently
    assert later["hkd"] == pytest.approx(2 * w["hkd"]) and later["ce"] == pytest.approx(w["ce"] / 2)
    with pytest.raises(ValueError, match="old and new"):
        task_weights(0, 10)


def test_local_ce_and_hard_kd():
    logits = torch.tensor([[5.0, -5.0, 1.0, 0.0]], requires_grad=True)
    loss = local_ce(logits, torch.tensor([2]), n_old=2)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad[0, :2], torch.zeros(2))  # old-class logits get nothing from the local CE
    assert loss.item() == pytest.approx(torch.log1p(torch.exp(torch.tensor(-1.0))).item())
    teacher = torch.tensor([[4.0, -5.0]])
    assert hard_kd(logits, teacher).item() == pytest.approx(0.5)  # L1 over the old columns only


def test_relation_kd_sees_only_the_geometry_of_the_batch():
    torch.manual_seed(0)
    rkd = RelationKD(8)
    rkd.student.load_state_dict(rkd.teacher.state_dict())
    f = torch.randn(6, 8)
    # angles are invariant to scaling and translation of the (linearly projected) features
    assert rkd(3.0 * f + 1.0, f).item() == pytest.approx(0.0, abs=1e-5)
    assert rkd(torch.randn(6, 8), f).item() > 0.1
    assert rkd.student.out_features == 16  # projected to twice the feature size (reference)


def test_balancing_ce_trains_the_head_only():
    head = nn.Linear(4, 3)
    f = torch.randn(5, 4, requires_grad=True)
    fr = torch.randn(5, 4, requires_grad=True)
    loss = balancing_ce(head, f, torch.zeros(5, dtype=torch.long), fr, torch.ones(5, dtype=torch.long))
    loss.backward()
    assert f.grad is None and fr.grad is None and head.weight.grad is not None


def test_replay_losses_are_summed_not_multiplied():
    torch.manual_seed(0)
    head, rkd = nn.Linear(4, 4, bias=False), RelationKD(4)
    f, tf, fr = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    weights = {**task_weights(2, 2), "ft": 0.0}  # the reference's product would switch relation KD off here
    terms = replay_losses(head(f), torch.tensor([2, 3] * 3), f, tf, head(fr), torch.tensor([0, 1] * 3), fr,
                          torch.randn(6, 2), head, rkd, n_old=2, weights=weights)
    total = sum(terms.values())
    total.backward()
    assert terms["rkd"].item() > 0 and rkd.student.weight.grad.abs().sum() > 0
    assert terms["ft"].item() == 0.0


def test_class_balanced_fine_tuning():
    w = class_balance_weights(torch.tensor([300.0, 300.0, 100.0, 0.0]))
    assert w.tolist() == [1.0, 1.0, 3.0, 300.0]  # an unseen class counts as seen once
    logits, replay = torch.randn(4, 4), torch.randn(4, 4)
    terms = finetune_losses(logits, torch.tensor([2, 3, 2, 3]), replay, torch.tensor([0, 1, 0, 1]), replay[:, :2],
                            n_old=2, class_weights=w, w_hkd=1.0)
    assert terms["hkd"].item() == 0.0 and terms["ce"].item() > 0
