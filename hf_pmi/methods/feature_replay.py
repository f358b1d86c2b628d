"""`feature_replay`: classifier-only replay of Gaussian-sampled class features, no images.

Old classes live on as the class Gaussians of the `FeatureBank` (the vision tower's output features
of their images, stored when they were learned). Every step draws ``batch_size`` features of old
classes and trains, next to the CE on real data, the **classifier** to keep recognising them: the
replayed features enter after the vision tower, so the replay term's gradient reaches the text side
only (text tower / projection, whatever of it trains) and never the vision tower. Nothing holds the
vision tower's features of old images in place: where the tower trains (LoRA), they drift away
from the stored Gaussians, which stay frozen, and replay keeps a classifier for features the tower
no longer produces. That is why it scores like `finetune` on the digits benchmark
(docs/benchmarks.md). A feature-replay peer of `pmi` would also need drift compensation (e.g. SDC)
or a frozen vision tower; this method is the plain baseline.

Each task reports ``feature_drift``: the mean of ``1 - cos(f_before(x), f_after(x))`` over the task's
training images ``x``, ``f_before`` / ``f_after`` the vision features before and after the task
(0: the tower did not move; the old classes' stored features are stale by about as much).
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


def feature_drift(before: dict[int, torch.Tensor], after: dict[int, torch.Tensor]) -> float:
    """Mean ``1 - cos`` between the features of the same images before and after a task (`class_features` dicts)."""
    cos = [F.cosine_similarity(before[c], after[c], dim=-1) for c in sorted(after)]
    return float(1 - torch.cat(cos).mean())


@register_method("feature_replay", config=FeatureReplayConfig)
class FeatureReplay(ContinualMethod):
    """Classifier-only feature replay (module docstring)."""

    def __init__(self, trainer, config=None):
        super().__init__(trainer, config)
        self.bank = FeatureBank()
        self.features_before: dict[int, torch.Tensor] | None = None

    def before_task(self, task_id: int) -> None:
        self.num_old = self.old_class_count(task_id)
        self.generator = torch.Generator().manual_seed(
            replay_seed(self.args.seed, task_id, self.trainer.accelerator.process_index))
        self.means, self.stds = self.bank.means, self.bank.stds  # stacked once per task, not per step
        task = self.tasks[task_id]
        self.features_before = class_features(self.unwrapped_model, self.real_batches(task.train))

    def replay_loss(self, out) -> torch.Tensor | None:
        """CE of ``batch_size`` features drawn from the old classes' Gaussians, against the classifier
        (the text embeddings of `out`); None before there are old classes."""
        if self.num_old == 0 or len(self.means) < self.num_old:
            return None
        classes = torch.randint(self.num_old, (self.config.batch_size,), generator=self.generator)
        means, stds = self.means[classes], self.stds[classes]
        feats = means + stds * torch.randn(means.shape, generator=self.generator)
        feats = F.normalize(feats.to(out.text_embeds.device), dim=-1)
        replay_logits = out.logit_scale * feats @ out.text_embeds.t()
        return F.cross_entropy(replay_logits, classes.to(replay_logits.device))

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        out = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
        replay = self.replay_loss(out)
        return out.loss if replay is None else out.loss + replay

    def after_task(self, task_id: int) -> dict:
        task = self.tasks[task_id]
        model = self.unwrapped_model.eval()
        feats = class_features(model, self.real_batches(task.train))
        self.bank.add_classes(task.class_ids, feats, train_contrastive=False)
        drift = feature_drift(self.features_before, feats) if self.features_before else float("nan")
        self.features_before = None
        return {"feature_drift": drift}

    def save(self, folder: str) -> None:
        self.bank.save_pretrained(os.path.join(folder, FOLDER_NAME))

    def load(self, folder: str) -> None:
        self.bank = FeatureBank.from_pretrained(os.path.join(folder, FOLDER_NAME))
