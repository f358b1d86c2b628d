"""Analytic heads on a BatchNorm classifier's penultimate features (ACIL's setting, issue 32 part 5).

ACIL (Zhuang et al., 2022) trains the network on the first task only, then freezes it and learns every
class by a closed-form head on the pooled features: exact under class-incremental order, no replay, no
gradient after the first task. Here the heads are hf_pmi's own statistic heads (`hf_pmi.heads`: ``ranpac``,
ridge regression on a fixed random ReLU expansion, which is ACIL's buffer layer plus ridge, and ``ncm``),
read from the input of the classifier layer (`penultimate_features`).

`learn_analytic` trains the first task with the BN family's own loop (`learn_tasks`, ``finetune``: there is
no teacher on the first task) unless the model already knows classes, then adds each task's classes to the
head and scores every seen task with it.

Example:
    >>> import torch
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> from hf_pmi.resnet.continual import ResNetContinualConfig, TensorTask
    >>> g = torch.Generator().manual_seed(0)
    >>> def task(c0):  # two classes, each a constant image of its own colour
    ...     y = torch.tensor([c0, c0 + 1] * 8)
    ...     x = (y.view(-1, 1, 1, 1).float() - 1.5) + 0.1 * torch.randn(16, 3, 8, 8, generator=g)
    ...     return TensorTask([c0, c0 + 1], x, y, x, y)
    >>> model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=0,
    ...                                                       image_size=8))
    >>> config = ResNetContinualConfig(method="finetune", epochs=2, batch_size=8, progress=False)
    >>> result = learn_analytic(model, [task(0), task(2)], config, head="ncm")
    >>> len(result["accuracy_matrix"]), result["head"].num_classes
    (2, 4)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..heads import ContinualHead, build_head
from ..metrics import continual_metrics
from ..statistics import eval_mode
from .continual import ResNetContinualConfig, TensorTask, learn_tasks, own_classes
from .learner import forward

BATCH = 500  # images per forward pass when collecting features (memory only; results do not depend on it)


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier layer's input (the pooled features) for images `x`, in eval mode, on the model's device."""
    device = next(model.parameters()).device
    with eval_mode(model):
        return torch.cat([forward(model, batch.to(device))[1].flatten(1).cpu() for batch in x.split(BATCH)])


def learn_analytic(model: nn.Module, tasks: list[TensorTask], config: ResNetContinualConfig | None = None,
                   head: str | ContinualHead = "ranpac", **head_settings) -> dict:
    """Train `tasks[0]` (unless `model` already has classes), freeze the model, and learn every task's classes
    with a statistic head on the penultimate features (see the module docstring).

    Args:
        model: a BatchNorm image classifier whose head can grow (e.g. `ResNet32ForImageClassification`).
        tasks: `TensorTask` s in class order (the first one is trained when the model knows no class).
        config: the first task's training (its ``epochs``, ``lr``, ``batch_size``, ...; the method is
            ``finetune``).
        head: a name of `hf_pmi.heads.HEADS` (``ranpac``, ``ncm``) or a `ContinualHead` to continue.
        head_settings: passed to `build_head` (e.g. ``projection_dim``, ``seed``).

    Returns ``accuracy_matrix`` (row t: accuracy of the head on each seen task after task t), the metrics of
    `hf_pmi.metrics.continual_metrics`, ``counts`` and ``head``.
    """
    config = config or ResNetContinualConfig(progress=False)
    if own_classes(model) == 0:  # ACIL: the network learns the first task by gradient, and nothing after it
        learn_tasks(model, tasks[:1], dataclasses.replace(config, method="finetune"))
    features = [(penultimate_features(model, t.x), penultimate_features(model, t.x_test)) for t in tasks]
    if isinstance(head, str):
        head = build_head(head, features[0][0].shape[1], **head_settings)
    matrix = []
    for t, task in enumerate(tasks):
        head.update(features[t][0], task.y)
        row = []
        for k in range(t + 1):
            test, labels = features[k][1], tasks[k].y_test
            row.append((head(test).argmax(-1) == labels).float().mean().item())
        matrix.append(row + [None] * (len(tasks) - t - 1))
    counts = [len(t.y_test) for t in tasks]
    return {"accuracy_matrix": matrix, **continual_metrics(matrix, counts), "counts": counts, "head": head}
