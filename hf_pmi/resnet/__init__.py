"""The BatchNorm path: a CIFAR ResNet as a transformers model, its blocks and statistics, per-layer
inversion on BN running statistics, the R-DFCIL-style replay losses and a task loop (issue 22).

Modules: `configuration` / `modeling` (the model), `heads` (growing classifiers, refusals), `blocks`
(the chain view), `statistics` (BN terms, block-input moments, class features), `inversion` (chain and
random start), `losses` (replay losses), `continual` (`learn_tasks`: every method's task loop on
tensors), `checkpoint` (per-task folders, resume, the card), `analytic` (statistic heads on the
penultimate features after the first task, ACIL's setting), `loop` (each training phase as one
`Trainer.train()`), `runner` (the loop behind `ContinualTrainer`
when it is given such a model).

Example:
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> model = ResNet32ForImageClassification(ResNet32Config(num_labels=4))
    >>> sum(p.numel() for p in model.parameters()) > 400_000  # ResNet-32: 0.46 M parameters
    True
"""

from .blocks import BNBlocks
from .configuration import ResNet32Config
from .heads import batchnorm_layers, classifier_linear, grow_classifier, require_batchnorm, require_image_classifier
from .inversion import BNInversionConfig, BNInversionResult, invert_bn, replay_targets
from .losses import RelationKD, finetune_losses, replay_losses, task_weights
from .modeling import ResNet32ForImageClassification, ResNet32ImageClassifierOutput, ResNet32Model, register_auto_classes
from .statistics import bn_kl, collect_block_statistics

register_auto_classes()

__all__ = [
    "BNBlocks", "BNInversionConfig", "BNInversionResult", "RelationKD", "ResNet32Config", "ResNet32ForImageClassification",
    "ResNet32ImageClassifierOutput", "ResNet32Model", "batchnorm_layers", "bn_kl", "classifier_linear",
    "collect_block_statistics", "finetune_losses", "grow_classifier", "invert_bn", "register_auto_classes",
    "replay_losses", "replay_targets", "require_batchnorm", "require_image_classifier", "task_weights",
]
