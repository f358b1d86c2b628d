"""`feature_replay`: replay Gaussian-sampled class features at the classifier, no images.

The feature-space peer of inversion replay (in the spirit of RAPF / SLCA): old classes live on as
the class Gaussians of the `FeatureBank`; every step draws ``replay_batch_size`` features of old
classes and trains the text classifier to keep recognising them, next to the CE on real data.
The vision tower gets no replay signal, so its drift is not corrected: that is what the
comparison with `pmi` shows.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..bank import FeatureBank, class_features
from . import ContinualMethod, old_class_count, register_method
from .pmi import BANK_FOLDER, _real_batches


@register_method("feature_replay")
class FeatureReplay(ContinualMethod):
    def __init__(self, trainer):
        super().__init__(trainer)
        self.bank = FeatureBank()

    def before_task(self, task_id: int) -> None:
        self.num_old = old_class_count(self.trainer, task_id)
        seed = self.args.seed * 1000 + task_id * 10 + self.trainer.accelerator.process_index
        self.generator = torch.Generator().manual_seed(seed)
        self.means, self.stds = self.bank.means, self.bank.stds  # stacked once per task, not per step

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        out = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
        if self.num_old == 0 or len(self.means) < self.num_old:
            return out.loss
        classes = torch.randint(self.num_old, (self.args.replay_batch_size,), generator=self.generator)
        means, stds = self.means[classes], self.stds[classes]
        feats = means + stds * torch.randn(means.shape, generator=self.generator)
        feats = F.normalize(feats.to(out.text_embeds.device), dim=-1)
        replay_logits = out.logit_scale * feats @ out.text_embeds.t()
        return out.loss + F.cross_entropy(replay_logits, classes.to(replay_logits.device))

    def after_task(self, task_id: int) -> dict:
        task = self.tasks[task_id]
        model = self.trainer.accelerator.unwrap_model(self.model).eval()
        feats = class_features(model, _real_batches(self.trainer, task.train))
        self.bank.add_classes(task.class_ids, feats, train_contrastive=False)
        return {}

    def save(self, folder: str) -> None:
        self.bank.save_pretrained(os.path.join(folder, BANK_FOLDER))

    def load(self, folder: str) -> None:
        self.bank = FeatureBank.from_pretrained(os.path.join(folder, BANK_FOLDER))
