"""The BatchNorm path: a CIFAR ResNet as a transformers model, its blocks and statistics, per-layer
inversion on BN running statistics and the R-DFCIL-style replay losses (issue 22, phase 1).

Standalone for now: nothing here is wired into `ContinualTrainer` yet.

Example:
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> model = ResNet32ForImageClassification(ResNet32Config(num_labels=4))
    >>> sum(p.numel() for p in model.parameters()) > 400_000  # ResNet-32: 0.46 M parameters
    True
"""

from .configuration import ResNet32Config
from .heads import batchnorm_layers, classifier_linear, grow_classifier, require_batchnorm, require_image_classifier
from .modeling import ResNet32ForImageClassification, ResNet32ImageClassifierOutput, ResNet32Model, register_auto_classes

register_auto_classes()

__all__ = [
    "ResNet32Config", "ResNet32ForImageClassification", "ResNet32ImageClassifierOutput", "ResNet32Model",
    "batchnorm_layers", "classifier_linear", "grow_classifier", "register_auto_classes", "require_batchnorm",
    "require_image_classifier",
]
