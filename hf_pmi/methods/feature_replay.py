"""`feature_replay`: replay Gaussian-sampled class features at the classifier, no images.

The feature-space peer of inversion replay (in the spirit of RAPF / SLCA): old classes live on as
the class Gaussians of the `FeatureBank`; every step draws ``batch_size`` features of old classes
and trains the text classifier to keep recognising them, next to the CE on real data. The vision
tower gets no replay signal, so its drift is not corrected: that is what the comparison with `pmi`
shows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..bank import FOLDER_NAME, FeatureBank, class_features
from ..seeding import replay_seed
from ..validation import require_count
from .base import ContinualMethod, MethodConfig, register_method

@dataclass
class FeatureReplayConfig(MethodConfig):
    """Settings of `feature_replay` (flags ``--replay_<field>``)."""

    flag_prefix: ClassVar[str] = "replay_"
    argument_group: ClassVar[str] = "feature replay (FeatureReplayConfig)"

    batch_size: int = field(default=64, metadata={"help": "Replayed features added to every real batch."})

    def __post_init__(self):
        require_count(self.flag_prefix + "batch_size", self.batch_size,
                      meaning=": every real batch is joined by this many replayed features")


@register_method("feature_replay", config=FeatureReplayConfig)
class FeatureReplay(ContinualMethod):
    def __init__(self, trainer, config=None):
        super().__init__(trainer, config)
        self.bank = FeatureBank()

    def before_task(self, task_id: int) -> None:
        self.num_old = self.old_class_count(task_id)
        self.generator = torch.Generator().manual_seed(
            replay_seed(self.args.seed, task_id, self.trainer.accelerator.process_index))
        self.means, self.stds = self.bank.means, self.bank.stds  # stacked once per task, not per step

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        out = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
        if self.num_old == 0 or len(self.means) < self.num_old:
            return out.loss
        classes = torch.randint(self.num_old, (self.config.batch_size,), generator=self.generator)
        means, stds = self.means[classes], self.stds[classes]
        feats = means + stds * torch.randn(means.shape, generator=self.generator)
        feats = F.normalize(feats.to(out.text_embeds.device), dim=-1)
        replay_logits = out.logit_scale * feats @ out.text_embeds.t()
        return out.loss + F.cross_entropy(replay_logits, classes.to(replay_logits.device))

    def after_task(self, task_id: int) -> dict:
        task = self.tasks[task_id]
        model = self.unwrapped_model.eval()
        feats = class_features(model, self.real_batches(task.train))
        self.bank.add_classes(task.class_ids, feats, train_contrastive=False)
        return {}

    def save(self, folder: str) -> None:
        self.bank.save_pretrained(os.path.join(folder, FOLDER_NAME))

    def load(self, folder: str) -> None:
        self.bank = FeatureBank.from_pretrained(os.path.join(folder, FOLDER_NAME))
