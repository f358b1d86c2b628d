"""`ResNet32Config`: the CIFAR-style ResNet of the reference's ResNet path (R-DFCIL, PMI's Table 1).

The architecture is the one the reference inherits from iCaRL / PODNet (``resnet_cifar.py`` of
R-DFCIL's cl-lite and of the PMI ResNet code): a 3x3 stride-1 stem (conv, BatchNorm, ReLU), three
stages of ``blocks_per_stage`` basic residual blocks with widths ``base_width x (1, 2, 4)``, the
first block of stages 2 and 3 halving the resolution by "option A" shortcuts (stride-2 subsampling
and zero-padded channels, no projection), **no ReLU after the residual sum**, global average
pooling and a bias-free linear classifier. ``blocks_per_stage=5`` and ``base_width=16`` give
ResNet-32 (1 + 3 x 5 x 2 + 1 layers, 0.46 M parameters).

Example:
    >>> config = ResNet32Config(num_labels=10)
    >>> config.widths, config.num_residual_blocks, config.feature_dim
    ((16, 32, 64), 15, 64)
    >>> ResNet32Config(blocks_per_stage=1, base_width=4).widths  # a tiny model for tests
    (4, 8, 16)
"""

from __future__ import annotations

from transformers import PretrainedConfig


class ResNet32Config(PretrainedConfig):
    """Configuration of `ResNet32ForImageClassification`.

    Args:
        num_channels: input channels (3 for RGB).
        base_width: width of the stem and of stage 1; stages 2 and 3 double it (reference 16).
        blocks_per_stage: residual blocks per stage, ``n`` of the reference (5: ResNet-32).
        image_size: the image size the model is trained at (32 CIFAR-100, 64 Tiny-ImageNet); the
            network itself accepts any size, this only serves the inversion's input shapes.
        zero_residual: initialise the second BatchNorm of every residual block with weight 0, so
            each block starts as the identity (reference).
        classifier_bias: a bias in the classifier (reference: none).
        classifier_init_std: std of the normal initialisation of classifier rows, new ones
            included (reference 0.001).
    """

    model_type = "hf_pmi_cifar_resnet"

    def __init__(
        self,
        num_channels: int = 3,
        base_width: int = 16,
        blocks_per_stage: int = 5,
        image_size: int = 32,
        zero_residual: bool = True,
        classifier_bias: bool = False,
        classifier_init_std: float = 0.001,
        **kwargs,
    ):
        if base_width < 1 or blocks_per_stage < 1:
            raise ValueError(
                f"base_width and blocks_per_stage must be >= 1, got {base_width} and {blocks_per_stage} "
                "(ResNet-32 is base_width=16, blocks_per_stage=5)."
            )
        self.num_channels = num_channels
        self.base_width = base_width
        self.blocks_per_stage = blocks_per_stage
        self.image_size = image_size
        self.zero_residual = zero_residual
        self.classifier_bias = classifier_bias
        self.classifier_init_std = classifier_init_std
        super().__init__(**kwargs)

    @property
    def widths(self) -> tuple[int, int, int]:
        return (self.base_width, 2 * self.base_width, 4 * self.base_width)

    @property
    def num_residual_blocks(self) -> int:
        return 3 * self.blocks_per_stage

    @property
    def feature_dim(self) -> int:
        """Size of the pooled features the classifier reads (and the inversion targets)."""
        return self.widths[-1]
