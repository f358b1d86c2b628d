"""A BatchNorm image classifier seen as the chain of blocks that per-layer inversion walks through.

Block indices: ``0`` the stem; ``1 .. K`` the residual blocks in order; ``K + 1`` the head (global
average pooling and the classifier) -> logits. The inversion targets are the pooled features, the
output of ``features_from``; its chain is blocks ``0 .. K`` (`feature_block` = K), the last of them
compared after pooling, as the reference's ResNet path does (its ``get_all_blocks``: stem plus
every residual block, the last one pooled).

Supported: `ResNet32ForImageClassification` (stem = conv-BN-ReLU; ResNet-32 has 15 residual
blocks, so 17 blocks with the head) and transformers' `ResNetForImageClassification` (stem = the
embedder: 7x7 conv-BN-ReLU and max-pooling; its basic or bottleneck layers are the residual
blocks), also inside a peft or DDP wrapper.

Each block gives access to its BatchNorm layers (`bn_layers`): their running moments are the
per-layer prior of the inversion. `input_prior` is the reference's prior for a block's input: the
affine parameters of the last BatchNorm of the block below (mean beta, variance gamma^2).

Example:
    >>> import torch
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=3)).eval()
    >>> blocks = BNBlocks(model)
    >>> blocks.num_blocks, blocks.feature_block, blocks.input_shape(3)
    (5, 3, (8, 16, 16))
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.allclose(blocks.forward_from(0, x), model(pixel_values=x).logits)
    True
    >>> h = blocks.forward_from(0, x, end=2)
    >>> torch.allclose(blocks.features_from(2, h), model(pixel_values=x).pooler_output)
    True
    >>> [name for name, _ in blocks.bn_layers(1)], round(sum(blocks.block_costs()), 6)
    (['bn_a', 'bn_b'], 1.0)
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import batchnorm_layers

# transformers' ResNetConfig has no image size; its models are ImageNet-sized.
DEFAULT_IMAGE_SIZE = 224


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (``.module``) or peft (``get_base_model()``) wrapper."""
    for _ in range(4):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            break
    return model


class BNBlocks:
    """Callable view of a BatchNorm image classifier as a chain of blocks (holds references, no copies).

    `image_size` gives the input size for `input_shape` and `block_costs` (default: the config's
    ``image_size``, else 224).
    """

    def __init__(self, model: nn.Module, image_size: int | None = None):
        self.model = unwrap(model)
        inner = getattr(self.model, "resnet", None)
        if inner is not None and hasattr(inner, "stem") and hasattr(inner, "stages"):  # ResNet32
            self.family = "hf_pmi_cifar_resnet"
            stem, residual = inner.stem, [b for stage in inner.stages for b in stage]
            stage_sizes = [len(stage) for stage in inner.stages]
            self._pool = lambda x: inner.pooler(x).flatten(1)
        elif inner is not None and hasattr(inner, "embedder") and hasattr(inner, "encoder"):  # transformers ResNet
            self.family = "resnet"
            stem, residual = inner.embedder, [layer for stage in inner.encoder.stages for layer in stage.layers]
            stage_sizes = [len(stage.layers) for stage in inner.encoder.stages]
            self._pool = lambda x: inner.pooler(x).flatten(1)
        else:
            raise TypeError(
                f"{type(self.model).__name__} is not a supported BatchNorm image classifier: hf_pmi's BN path takes "
                "ResNet32ForImageClassification or transformers' ResNetForImageClassification (a `resnet` backbone "
                "with stem and residual stages, and a `classifier`)."
            )
        self.classifier = self.model.classifier
        self.modules: list[nn.Module] = [stem, *residual]
        self.stage_sizes = stage_sizes
        self.feature_block = len(self.modules) - 1
        self.num_blocks = len(self.modules) + 1
        config = getattr(self.model, "config", None)
        self.image_size = image_size or getattr(config, "image_size", None) or DEFAULT_IMAGE_SIZE
        self.num_channels = getattr(config, "num_channels", 3)
        self._trace: tuple[list[tuple[int, ...]], list[float]] | None = None

    # ----- running the chain -------------------------------------------------------------------
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling of a map (B, C, h, w) -> features (B, C)."""
        return self._pool(x)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Run block `i` alone on its input `x` (the head returns logits)."""
        if i == self.num_blocks - 1:
            return self.classifier(self.pool(x))
        return self.modules[i](x)

    def forward_from(self, start: int, x: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. end-1`` (default: to the logits) on the input of `start`."""
        end = self.num_blocks if end is None else end
        for i in range(start, end):
            x = self.block(i, x)
        return x

    def features_from(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (the classifier's input) from the input of block `start`."""
        return self.pool(self.forward_from(start, x, end=self.feature_block + 1))

    def stage_groups(self) -> list[tuple[int, int]]:
        """Block ranges ``[lo, hi)`` of the stem and of each stage: the links of a coarser chain.

        Example:
            >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
            >>> BNBlocks(ResNet32ForImageClassification(ResNet32Config(num_labels=2))).stage_groups()
            [(0, 1), (1, 6), (6, 11), (11, 16)]
        """
        groups, lo = [(0, 1)], 1
        for size in self.stage_sizes:
            groups.append((lo, lo + size))
            lo += size
        return groups

    # ----- statistics ----------------------------------------------------------------------------
    def bn_layers(self, i: int) -> list[tuple[str, nn.Module]]:
        """``(name within the block, module)`` of the BatchNorm layers inside block `i`, in module order."""
        if i == self.num_blocks - 1:
            return []
        return batchnorm_layers(self.modules[i])

    def all_bn_layers(self, start: int = 0) -> list[tuple[str, nn.Module]]:
        """BatchNorm layers of blocks ``start .. feature_block``, named ``block{i}.{name}``."""
        return [(f"block{i}.{n}", m) for i in range(start, self.feature_block + 1) for n, m in self.bn_layers(i)]

    def input_prior(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The reference's prior of block `i`'s input, per channel: ``(beta, gamma^2)`` of the last
        BatchNorm of block ``i - 1`` (None for the pixels of block 0, or if that block has none).

        It ignores what follows that BatchNorm (the ReLU of the stem, the shortcut added after a
        residual block), so it is a rough prior; `hf_pmi.resnet.statistics` records exact ones."""
        if i == 0:
            return None
        layers = self.bn_layers(i - 1)
        if not layers:
            return None
        bn = layers[-1][1]
        return bn.bias.detach().clone(), bn.weight.detach().pow(2)

    # ----- shapes and costs ----------------------------------------------------------------------
    def _run_trace(self) -> tuple[list[tuple[int, ...]], list[float]]:
        """One forward of a single zero image: each block's input shape and multiply-adds."""
        if self._trace is not None:
            return self._trace
        macs = [0.0] * self.num_blocks
        current = [0]

        def count(module, args, out):
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
                macs[current[0]] += out.numel() * k
            elif isinstance(module, nn.Linear):
                macs[current[0]] += out.numel() * module.in_features

        handles = [m.register_forward_hook(count) for m in self.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        param = next(self.model.parameters())
        x = torch.zeros(1, self.num_channels, self.image_size, self.image_size, device=param.device, dtype=param.dtype)
        shapes = []
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                for i in range(self.num_blocks):
                    shapes.append(tuple(x.shape[1:]))
                    current[0] = i
                    x = self.block(i, x)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        total = float(sum(macs)) or 1.0
        self._trace = (shapes, [m / total for m in macs])
        return self._trace

    def input_shape(self, i: int) -> tuple[int, ...]:
        """Shape of one sample entering block `i` (without the batch dimension)."""
        return self._run_trace()[0][i]

    def block_costs(self) -> list[float]:
        """Relative cost of each block (fractions summing to 1) from the multiply-adds of its
        convolutions and linear layers at `image_size`; BatchNorm, ReLU and additions are not
        counted (a few per cent at most). A per-layer inversion step on block i counts as
        ``costs[i]`` full-model passes."""
        return list(self._run_trace()[1])
