"""`pmi` (the paper's method) and `full_inversion` (its DeepInversion-style baseline).

Between tasks: layer statistics and class Gaussians (+ contrastive models) of the new classes go
into the `FeatureBank`; a replay buffer of ``per_class`` inverted patch maps per seen class is
synthesised. During the next task every real batch is joined by ``replay_batch_size`` replayed
samples (drawn with replacement) and trained with `hf_pmi.replay.replay_losses` against a frozen
teacher (the model at the end of the previous task).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch.utils.data import DataLoader

from .. import faults
from ..bank import FeatureBank
from ..blocks import VisionBlocks
from ..inversion import InversionConfig, synthesize_replay
from ..names_only import NamesOnlyLearner, check_bank, is_names_only
from ..replay import replay_losses, task_weights
from ..statistics import collect_statistics_and_features
from . import ContinualMethod, old_class_count, register_method

BANK_FOLDER = "feature_bank"
GRID_NAME = "replay_samples.png"


def _real_batches(trainer, dataset):
    """(pixel_values, labels) of a whole task on this process, in order (no sharding, no shuffle)."""
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
    for batch in loader:
        yield batch["pixel_values"].to(trainer.args.device), batch["labels"].to(trainer.args.device)


@register_method("pmi")
class PMI(ContinualMethod):
    """Per-layer model inversion replay (Tong et al., NeurIPS 2025)."""

    inversion_mode = "pmi"

    def __init__(self, trainer):
        super().__init__(trainer)
        config = trainer.inversion_config or InversionConfig()
        self.inversion = dataclasses.replace(config, mode=self.inversion_mode)
        self.bank = FeatureBank()
        self.teacher = None
        self.buffer: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_report: dict | None = None
        self.names_only = NamesOnlyLearner(self)  # tasks given by class names only (hf_pmi.names_only)
        self.task_id = None

    def validate(self) -> None:
        if self.inversion.start_block != 1:
            raise ValueError(
                "Replay training feeds samples after the patch embedding, so the inversion must produce patch maps: "
                f"set start_block=1 (got {self.inversion.start_block}). Pixel inversion (0) is for `invert` directly."
            )

    # ----- training ----------------------------------------------------------------------------
    def train_dataset(self, task_id: int):
        return self.names_only.data if is_names_only(self.tasks[task_id]) else self.tasks[task_id].train

    def before_task(self, task_id: int) -> None:
        self.task_id = task_id
        self.num_old = old_class_count(self.trainer, task_id)
        self.teacher = self.snapshot_teacher() if self.num_old and self.buffer is not None else None
        if self.teacher is not None:
            self.weights = task_weights(
                self.num_old, len(self.tasks[task_id].class_ids), self.args.l_ce, self.args.l_hkd, self.args.l_tkd
            )
            seed = self.args.seed * 1000 + task_id * 10 + self.trainer.accelerator.process_index
            self.generator = torch.Generator().manual_seed(seed)  # replay draws differ per process, as data shards do
        if is_names_only(self.tasks[task_id]):
            self.names_only.before_task(task_id)

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        if self.teacher is None:  # first task: plain CE
            return model(pixel_values=inputs["pixel_values"], labels=inputs["labels"]).loss
        if is_names_only(self.tasks[self.task_id]):
            return self.names_only.compute_loss(model, inputs)
        samples, labels = self.buffer
        idx = torch.randint(len(labels), (self.args.replay_batch_size,), generator=self.generator)
        replay, replay_labels = samples[idx.to(samples.device)], labels[idx.to(labels.device)]
        out = model(pixel_values=inputs["pixel_values"], replay_patch_maps=replay)
        with torch.no_grad():
            teacher_out = self.teacher(replay_patch_maps=replay)
        terms = replay_losses(
            out, teacher_out, inputs["labels"], replay_labels, self.num_old, self.weights, self.args.l_ft,
            self.args.ft_detach,
        )
        return sum(terms.values())

    # ----- between tasks ---------------------------------------------------------------------------
    def after_task(self, task_id: int) -> dict:
        task = self.tasks[task_id]
        if is_names_only(task):
            return {**self.names_only.after_task(task), **self.synthesize()}
        model = self.trainer.accelerator.unwrap_model(self.model)
        model.eval()
        progress = self.trainer.is_world_process_zero() and not self.args.disable_tqdm
        stats, features = collect_statistics_and_features(model, _real_batches(self.trainer, task.train), progress)
        self.bank.update_statistics(stats)
        self.bank.add_classes(
            task.class_ids,
            features,
            train_contrastive=self.inversion.selection == "cfs",  # g_c only serves CFS
            seed=self.args.seed,
            progress=progress,
        )
        self.names_only.after_real_task(task, _real_batches(self.trainer, task.train))
        return self.synthesize()

    def synthesize(self) -> dict:
        """Regenerate the replay buffer for every class in the bank."""
        model = self.trainer.accelerator.unwrap_model(self.model)
        with faults.counting_module_calls("inversion"):  # crash tests only (HF_PMI_KILL_AT)
            samples, labels, report = synthesize_replay(
                model,
                self.bank,
                list(range(self.bank.num_classes)),
                dataclasses.replace(self.inversion, inversion_seed=self.args.seed),
                accelerator=self.trainer.accelerator,
                progress=self.trainer.is_world_process_zero() and not self.args.disable_tqdm,
            )
        self.buffer = (samples, labels)
        self.last_report = {k: v for k, v in report.items() if k != "curve"}
        return {
            "inversion_seconds": report["seconds"],
            "inversion_full_model_passes": report["full_model_passes"],
            "inversion_feature_mse": report.get("final_feature_mse", float("nan")),
        }

    # ----- checkpoint --------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        self.bank.save_pretrained(os.path.join(folder, BANK_FOLDER))
        if self.buffer is not None and self.args.keep_replay_samples:
            from ..visualize import patch_maps_to_images, save_image_grid

            image_processor = self.trainer.processing_class.image_processor
            n = self.args.keep_replay_samples
            samples, labels = self.buffer
            images = patch_maps_to_images(
                self.trainer.accelerator.unwrap_model(self.model), samples[:n],
                image_processor.image_mean, image_processor.image_std,
            )
            save_image_grid(images, labels[:n].tolist(), self.model.class_names, os.path.join(folder, GRID_NAME))

    def load(self, folder: str) -> None:
        self.bank = FeatureBank.from_pretrained(os.path.join(folder, BANK_FOLDER))
        if any(is_names_only(t) for t in self.tasks):
            check_bank(self.bank, folder)  # before the inversion work below
        self.synthesize()  # the buffer is not stored: it is regenerated, data-free, from the bank

    def card_info(self) -> dict | None:
        keys = ("preset", "mode", "start_block", "layer_steps", "first_block_steps", "refine_steps", "alpha_rf",
                "alpha_tv", "per_class", "selection")
        info = {k: getattr(self.inversion, k) for k in keys}
        info["a_layer"] = self.inversion.layer_weight(VisionBlocks(self.model).num_blocks)
        if self.last_report is not None:
            info.update(seconds=self.last_report["seconds"], full_model_passes=self.last_report["full_model_passes"])
        return info


@register_method("full_inversion")
class FullInversion(PMI):
    """Same losses and buffer, inverted from a random start by full-model steps only.

    Unless ``full_steps`` was changed from its default, its budget is set to the number of
    full-model-equivalent passes one PMI chunk costs, so both spend the same compute.
    """

    inversion_mode = "full"

    def __init__(self, trainer):
        super().__init__(trainer)
        default = InversionConfig().full_steps
        if self.inversion.full_steps == default:
            passes = round(pmi_passes_per_chunk(VisionBlocks(trainer.model), self.inversion))
            self.inversion = dataclasses.replace(self.inversion, full_steps=passes)


def pmi_passes_per_chunk(blocks: VisionBlocks, config: InversionConfig) -> float:
    """Full-model-equivalent passes of one PMI chunk (per-layer stage + refinement), by block costs."""
    costs = blocks.block_costs()
    last = blocks.num_blocks - 1
    per_layer = sum(config.layer_steps * costs[i] for i in range(config.start_block + 1, last + 1))
    first = config.first_block_steps * costs[config.start_block]
    refine_chunks = math.ceil(config.batch_size / (config.refine_batch_size or config.batch_size))
    return per_layer + first + refine_chunks * config.refine_steps * sum(costs[config.start_block:])
