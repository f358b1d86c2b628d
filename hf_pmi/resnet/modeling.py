"""`ResNet32ForImageClassification`: the reference's CIFAR ResNet as a transformers `PreTrainedModel`.

See `hf_pmi.resnet.configuration` for the architecture. Module names (and so checkpoint keys):
``resnet.stem.{conv,bn}``, ``resnet.stages.{s}.{b}.{conv_a,bn_a,conv_b,bn_b}``, ``classifier``.
The classifier grows with each task (`add_classes`, old rows kept bit for bit).

Importing `hf_pmi.resnet` registers the model with the Auto classes, so
``AutoModelForImageClassification.from_pretrained(folder)`` loads a saved one.

Example:
    >>> import tempfile, torch
    >>> model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=3)).eval()
    >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    >>> tuple(out.logits.shape), tuple(out.pooler_output.shape), out.loss.dim()
    ((2, 3), (2, 16), 0)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     model.save_pretrained(d)
    ...     again = ResNet32ForImageClassification.from_pretrained(d).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.equal(again(pixel_values=x).logits, model(pixel_values=x).logits)
    True
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention
from transformers.utils import ModelOutput

from .configuration import ResNet32Config


@dataclass
class ResNet32ImageClassifierOutput(ModelOutput):
    """``logits`` (B, C); ``pooler_output`` the pooled features the classifier reads (B, D) (the
    inversion targets and the relation-KD inputs); ``hidden_states`` the stem's and every residual
    block's output when asked for."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Stem(nn.Module):
    """3x3 stride-1 convolution, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut, no ReLU after the sum (the reference's block).

    ``downsample``: stride 2 and twice the channels; the shortcut takes every second pixel and pads
    the new channels with zeros ("option A").
    """

    def __init__(self, in_channels: int, downsample: bool = False):
        super().__init__()
        self.downsample = downsample
        out = 2 * in_channels if downsample else in_channels
        self.conv_a = nn.Conv2d(in_channels, out, kernel_size=3, stride=2 if downsample else 1, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(out)
        self.conv_b = nn.Conv2d(out, out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(out)
        self.bn_b._hf_pmi_zero_init = True  # read by _init_weights when config.zero_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        if self.downsample:
            x = x[..., ::2, ::2]
            x = torch.cat([x, torch.zeros_like(x)], dim=1)
        return x + y


class ResNet32PreTrainedModel(PreTrainedModel):
    config: ResNet32Config
    config_class = ResNet32Config
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module):
        """The reference's initialisation: He (fan-out) convolutions, BatchNorm 1/0 (0 for the second
        BatchNorm of a residual block with ``zero_residual``), classifier rows N(0, 0.001^2)."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            zero = getattr(module, "_hf_pmi_zero_init", False) and self.config.zero_residual
            (init.zeros_ if zero else init.ones_)(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if module.num_batches_tracked is not None:
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.classifier_init_std)
            if module.bias is not None:
                init.zeros_(module.bias)


class ResNet32Model(ResNet32PreTrainedModel):
    """The backbone: stem, three stages, global average pooling -> ``pooler_output`` (B, D)."""

    def __init__(self, config: ResNet32Config):
        super().__init__(config)
        w = config.widths
        self.stem = Stem(config.num_channels, w[0])
        stages = []
        for s, width in enumerate(w):
            first = ResidualBlock(w[s - 1], downsample=True) if s > 0 else ResidualBlock(width)
            stages.append(nn.Sequential(first, *(ResidualBlock(width) for _ in range(config.blocks_per_stage - 1))))
        self.stages = nn.ModuleList(stages)
        self.pooler = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPoolingAndNoAttention:
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        x = self.stem(pixel_values)
        hidden = [x]
        for stage in self.stages:
            for block in stage:
                x = block(x)
                hidden.append(x)
        pooled = self.pooler(x).flatten(1)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=x, pooler_output=pooled, hidden_states=tuple(hidden) if output_hidden_states else None
        )


class ResNet32ForImageClassification(ResNet32PreTrainedModel):
    """ResNet-32 (or any depth/width of `ResNet32Config`) with a growing linear classifier."""

    def __init__(self, config: ResNet32Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.resnet = ResNet32Model(config)
        with warnings.catch_warnings():  # num_labels 0 (no task yet): torch warns that a 0-row init is a no-op
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.classifier = nn.Linear(config.feature_dim, config.num_labels, bias=config.classifier_bias)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, after verifying a task folder's files against the checksums its
        ``continual_state.json`` records (`hf_pmi.checkpoint.verify_task_folder`; also through
        ``AutoModelForImageClassification`` and ``pipeline``); from the Hub, safetensors weights only."""
        from ..checkpoint import verify_task_folder

        verify_task_folder(pretrained_model_name_or_path, kwargs.get("revision"), token=kwargs.get("token"),
                           cache_dir=kwargs.get("cache_dir"), subfolder=kwargs.get("subfolder") or None)
        if not os.path.isdir(os.fspath(pretrained_model_name_or_path)):
            kwargs.setdefault("use_safetensors", True)  # a pickle is never loaded from the Hub
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> ResNet32ImageClassifierOutput:
        if pixel_values is None:
            raise ValueError("ResNet32ForImageClassification needs pixel_values (B, C, H, W).")
        out = self.resnet(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(out.pooler_output)
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return ResNet32ImageClassifierOutput(
            loss=loss, logits=logits, pooler_output=out.pooler_output, hidden_states=out.hidden_states
        )

    def add_classes(self, num_new: int, names: list[str] | None = None) -> None:
        """Grow the classifier by `num_new` rows (old rows unchanged); see `hf_pmi.resnet.heads.grow_classifier`."""
        from .heads import grow_classifier

        grow_classifier(self, num_new, names)


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForImageClassification`` know this model type (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    try:
        AutoConfig.register(ResNet32Config.model_type, ResNet32Config)
    except ValueError:  # already registered
        pass
    for auto, cls in ((AutoModel, ResNet32Model), (AutoModelForImageClassification, ResNet32ForImageClassification)):
        try:
            auto.register(ResNet32Config, cls)
        except ValueError:
            pass
