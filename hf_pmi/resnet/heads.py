"""Growing classifier heads and the checks a BatchNorm image classifier must pass.

A class-incremental model adds classifier rows as tasks arrive; the rows of earlier classes must
stay exactly as they are. `grow_classifier` does that for `ResNet32ForImageClassification` and for
transformers' `ResNetForImageClassification` (whose head is ``Sequential(Flatten, Linear)``, or
``Sequential(Flatten, Identity)`` when built with ``num_labels=0``), and for any model whose
``classifier`` is an ``nn.Linear`` or a ``Sequential`` ending in one. The config's ``num_labels``,
``id2label`` and ``label2id`` follow.

Example:
    >>> import torch
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2))
    >>> old = model.classifier[1].weight.detach().clone()
    >>> grow_classifier(model, 3, ["c", "d", "e"])
    >>> model.config.num_labels, model.config.id2label[4], torch.equal(model.classifier[1].weight[:2], old)
    (5, 'e', True)
"""

from __future__ import annotations

import torch
from torch import nn

# New rows are drawn N(0, std^2): the reference initialises every classifier with std 0.001, so a
# new class starts with near-zero logits and does not disturb the old ones before training.
DEFAULT_INIT_STD = 0.001


def classifier_linear(model: nn.Module) -> tuple[nn.Module, str | int | None]:
    """The growable head of `model`: ``(parent, key)`` such that the classifier layer is
    ``parent.key`` (an attribute name) or ``parent[key]`` (an index). Raises `TypeError` naming the
    fix when there is none."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return model, "classifier"
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], (nn.Linear, nn.Identity)):
        return head, len(head) - 1
    raise TypeError(
        f"{type(model).__name__} has no classifier head that can grow (found {type(head).__name__ if head is not None else 'none'} "
        "at `model.classifier`). hf_pmi grows a final nn.Linear at `model.classifier` or `model.classifier[-1]`, as in "
        "ResNet32ForImageClassification and transformers' ResNetForImageClassification: give your model such a head, "
        "or use one of those."
    )


def _get(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def classifier_layer(model: nn.Module) -> nn.Module:
    """The growable head layer itself (an ``nn.Linear``, or ``nn.Identity`` before the first class)."""
    return _get(*classifier_linear(model))


def _set(parent, key, module):
    if isinstance(key, int):
        parent[key] = module
    else:
        setattr(parent, key, module)


def feature_dim(model: nn.Module) -> int:
    """Size of the pooled features the classifier reads."""
    config = model.config
    if hasattr(config, "feature_dim"):
        return config.feature_dim
    if getattr(config, "hidden_sizes", None):
        return config.hidden_sizes[-1]
    layer = classifier_layer(model)
    if isinstance(layer, nn.Linear):
        return layer.in_features
    raise TypeError(f"Cannot tell the feature size of {type(model).__name__}: its config has no hidden_sizes.")


@torch.no_grad()
def grow_classifier(model: nn.Module, num_new: int, names: list[str] | None = None,
                    init_std: float | None = None, generator: torch.Generator | None = None) -> None:
    """Add `num_new` classifier rows to `model` in place; earlier rows (and bias entries) are copied
    bit for bit, new rows drawn N(0, init_std^2) (default: ``config.classifier_init_std`` or 0.001),
    new bias entries 0. `names` label the new classes in ``config.id2label`` (default ``"LABEL_i"``).
    The new layer keeps the old one's device, dtype and ``requires_grad``.
    """
    if num_new < 1:
        raise ValueError(f"num_new must be >= 1, got {num_new}.")
    if names is not None and len(names) != num_new:
        raise ValueError(f"Got {len(names)} names for {num_new} new classes.")
    parent, key = classifier_linear(model)
    old = _get(parent, key)
    std = init_std if init_std is not None else getattr(model.config, "classifier_init_std", DEFAULT_INIT_STD)
    if isinstance(old, nn.Linear):
        n_old, dim, bias = old.out_features, old.in_features, old.bias is not None
        ref = old.weight
        trainable = old.weight.requires_grad
    else:  # Identity: a transformers ResNet built with num_labels=0
        n_old, dim, bias = 0, feature_dim(model), True
        ref = next(model.parameters())
        trainable = True
    new = nn.Linear(dim, n_old + num_new, bias=bias).to(device=ref.device, dtype=ref.dtype)
    new.weight.normal_(0.0, std, generator=generator)
    if bias:
        new.bias.zero_()
    if n_old:
        new.weight[:n_old].copy_(old.weight)
        if bias:
            new.bias[:n_old].copy_(old.bias)
    new.requires_grad_(trainable)
    _set(parent, key, new)
    config = model.config
    id2label = {i: config.id2label.get(i, f"LABEL_{i}") for i in range(n_old)} if n_old else {}
    for j in range(num_new):
        id2label[n_old + j] = names[j] if names is not None else f"LABEL_{n_old + j}"
    config.id2label = id2label
    config.label2id = {v: k for k, v in id2label.items()}
    config.num_labels = n_old + num_new
    if hasattr(model, "num_labels"):
        model.num_labels = n_old + num_new


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """``(name, module)`` of every BatchNorm2d that keeps running statistics, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def require_batchnorm(model: nn.Module, method: str = "pmi") -> None:
    """Refuse a model whose layers keep no BatchNorm running statistics for a BN-statistics method.

    Example:
        >>> require_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
        Traceback (most recent call last):
        ...
        ValueError: Method 'pmi' inverts the model on its BatchNorm running statistics, but Sequential has no BatchNorm layer with running statistics. Use a BatchNorm network (ResNet32ForImageClassification, transformers' ResNetForImageClassification), or a method that needs no statistics ('finetune', 'lwf').
    """
    if not batchnorm_layers(model):
        raise ValueError(
            f"Method {method!r} inverts the model on its BatchNorm running statistics, but {type(model).__name__} has no "
            "BatchNorm layer with running statistics. Use a BatchNorm network (ResNet32ForImageClassification, "
            "transformers' ResNetForImageClassification), or a method that needs no statistics ('finetune', 'lwf')."
        )


def require_image_classifier(model: nn.Module) -> None:
    """Refuse a model that does not take ``pixel_values`` (a text or audio model)."""
    if getattr(model, "main_input_name", "pixel_values") != "pixel_values":
        raise TypeError(
            f"{type(model).__name__} takes {model.main_input_name!r}, not images: the BatchNorm path needs an image "
            "classifier that takes `pixel_values` (an AutoModelForImageClassification model such as ResNet)."
        )
