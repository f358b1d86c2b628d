"""Analytic heads on a BatchNorm classifier's penultimate features (ACIL's setting): the network learns the
first task, then nothing moves but the head's statistics, which stay exact."""

import torch

from hf_pmi.heads import build_head
from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
from hf_pmi.resnet.analytic import learn_analytic, penultimate_features
from hf_pmi.resnet.continual import ResNetContinualConfig, TensorTask


def colour_tasks(num_classes=8, per_task=2, train=30, test=10, seed=0):
    """Each class a colour (a random RGB per class) plus pixel noise, 8 px: separable by colour."""
    g = torch.Generator().manual_seed(seed)
    colours = 2 * torch.rand(num_classes, 3, 1, 1, generator=g) - 1

    def tensors(per_class):
        y = torch.arange(num_classes).repeat_interleave(per_class)
        return colours[y] + 0.3 * torch.randn(len(y), 3, 8, 8, generator=g), y

    (x, y), (xt, yt) = tensors(train), tensors(test)
    tasks = []
    for c0 in range(0, num_classes, per_task):
        m, mt = (y >= c0) & (y < c0 + per_task), (yt >= c0) & (yt < c0 + per_task)
        tasks.append(TensorTask(list(range(c0, c0 + per_task)), x[m], y[m], xt[mt], yt[mt]))
    return tasks


def test_acil_trains_the_first_task_then_only_the_head_learns():
    tasks = colour_tasks()
    torch.manual_seed(0)
    model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=0, image_size=8))
    config = ResNetContinualConfig(method="finetune", epochs=4, batch_size=16, progress=False)
    result = learn_analytic(model, tasks, config, head="ranpac", projection_dim=500)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    # the network knows the first task's classes only; the head knows all 8 (chance 1/8)
    assert model.config.num_labels == 2 and result["head"].num_classes == 8
    assert result["a_last"] > 0.5, result["accuracy_matrix"]
    # exact under class-incremental order: the same as one fit on every task's features (the backbone is frozen)
    union = build_head("ncm", result["head"].feature_dim)
    incremental = learn_analytic(model, tasks, config, head="ncm")
    union.update(torch.cat([penultimate_features(model, t.x) for t in tasks]), torch.cat([t.y for t in tasks]))
    torch.testing.assert_close(incremental["head"].sums, union.sums)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in after_first.items())  # nothing trained again
