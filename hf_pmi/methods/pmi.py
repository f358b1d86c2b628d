"""`pmi` (the paper's method) and `full_inversion` (its DeepInversion-style baseline).

Between tasks: layer statistics and class Gaussians (+ contrastive models) of the new classes go
into the `FeatureBank`; ``sampling.per_class`` samples of each new class are inverted into the
replay buffer (`hf_pmi.synthesis`), which keeps the samples of earlier classes (``buffer``:
`BufferConfig`) and is saved with the checkpoint. The samples are inputs of vision block
``inversion.start_block`` (the replay block k): 1 for patch maps; with every parameter below block
k frozen (LoRA restricted to the encoder layers from k - 2 on), k >= 2 replays tokens entering
encoder layer k - 2, and both inversion and replay skip the blocks below. During the next task
every real batch is joined by ``replay.batch_size`` replayed samples and trained with the replay
losses against a frozen teacher (`hf_pmi.methods.rehearsal`). Tasks given by class names only are
learned through `hf_pmi.names_only.NamesOnlyLearner`.

The inversion settings are resolved once, when the method is built: an unset ``inversion.seed`` is
the run's ``--seed``, and for `full_inversion` an unset ``inversion.full_steps`` is the budget of
one per-layer batch of `pmi` (`hf_pmi.inversion.full_steps`); values given explicitly are kept.

Example:
    >>> from hf_pmi.inversion import InversionConfig
    >>> config = PMIConfig(inversion=InversionConfig(layer_steps=50))
    >>> config.inversion.layer_steps, config.replay.batch_size, config.sampling.per_class
    (50, 64, 5)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from ..bank import FOLDER_NAME, FeatureBank, SamplingConfig
from ..blocks import VisionBlocks, layers_below_pattern
from ..contrastive import SelectionConfig
from ..data import TaskPlan
from ..inversion import InversionConfig, full_steps, invert
from ..log import get_logger
from ..names_only import NamesOnlyLearner, check_bank, is_names_only, validate_tasks
from ..replay import ReplayConfig, cropped_batches
from ..seeding import task_seed
from ..statistics import collect_layer_statistics, collect_statistics_and_features
from ..synthesis import BUFFER_NAME, DTYPES, BufferConfig, load_buffer, save_buffer, synthesize_replay
from .base import MethodConfig, register_method
from .rehearsal import ReplayMethod

logger = get_logger()
CARD_INVERSION_KEYS = ("preset", "start_block", "layer_steps", "first_block_steps", "refine_steps", "alpha_rf",
                       "alpha_tv", "full_steps")


@dataclass
class PMIConfig(MethodConfig):
    """Settings of `pmi` and `full_inversion`: replay training, inversion, replay targets, CFS and the buffer."""

    replay: ReplayConfig = field(default_factory=ReplayConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)


@register_method("pmi", config=PMIConfig)
class PMI(ReplayMethod):
    """Per-layer model inversion replay (Tong et al., NeurIPS 2025)."""

    mode = "pmi"
    learns_from_names = True

    def __init__(self, trainer, config: PMIConfig | None = None):
        super().__init__(trainer, config)
        self.inversion = self.resolve_inversion(self.config.inversion)
        self.replay_block = self.inversion.start_block
        self.buffer_targets = None  # the targets the buffer's samples were inverted toward (refresh needs them)
        self.bank = FeatureBank()
        self.last_report: dict | None = None
        self.plan: TaskPlan | None = None
        self.previous_statistics = None  # replay.statistics_model "previous": this task's, from the model before it
        self.names_only = NamesOnlyLearner.for_run(trainer.model, trainer.tasks, trainer.args.device)

    def resolve_inversion(self, config: InversionConfig) -> InversionConfig:
        """The inversion settings of this run (module docstring)."""
        return dataclasses.replace(config, seed=config.seed if config.seed is not None else self.args.seed)

    def validate(self) -> None:
        k = self.replay_block
        blocks = VisionBlocks(self.unwrapped_model)
        if not 1 <= k <= blocks.num_blocks - 2:
            raise ValueError(
                f"inversion_start_block={k} is the block replay enters, so it must be between 1 (patch maps, after "
                f"the frozen patch embedding) and {blocks.num_blocks - 2} (the last encoder layer). Pixel inversion "
                "(0) is for `hf_pmi.inversion.invert` directly."
            )
        below = {id(p) for i in range(k) for p in blocks.block_parameters(i)}
        trained = [name for name, p in self.unwrapped_model.named_parameters() if p.requires_grad and id(p) in below]
        if trained:
            pattern = layers_below_pattern(k)
            raise ValueError(
                f"Replay enters the vision tower at block {k} (inversion_start_block), so nothing below it may train: "
                f"replayed samples never pass through those blocks, and old classes would drift there unseen. "
                f"{len(trained)} parameter(s) below block {k} train, e.g. {trained[:3]}. Restrict LoRA to the encoder "
                f"layers from {k - 2} on"
                + (f" (`LoraConfig(..., exclude_modules={pattern!r})`, "
                   "`hf_pmi.blocks.layers_below_pattern`; the recipes do it from --inversion_start_block)" if pattern else "")
                + ", freeze the rest, or choose a lower --inversion_start_block."
            )
        if any(is_names_only(t) for t in self.tasks):
            validate_tasks(self.tasks, self.unwrapped_model)

    # ----- training ----------------------------------------------------------------------------
    def before_task(self, task_id: int) -> None:
        super().before_task(task_id)
        task = self.tasks[task_id]
        self.plan = None
        self.previous_statistics = None
        if not is_names_only(task) and self.config.replay.statistics_model == "previous":
            self.previous_statistics = collect_layer_statistics(
                self.unwrapped_model, (x for x, _ in self.statistics_batches(task, task_id)), self.show_progress)
        if is_names_only(task):
            self.plan = self.names_only.prepare(
                self.unwrapped_model, self.bank, task, self.trainer.processing_class.tokenizer, self.inversion,
                self.mode, self.args.seed, task_id, self.show_progress, self.args.per_device_train_batch_size,
                self.trainer.accelerator.num_processes)

    def plan_task(self, task_id: int) -> TaskPlan:
        return self.plan if self.plan is not None else super().plan_task(task_id)

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        task = self.tasks[self.task_id]
        if self.teacher is None or not is_names_only(task):
            return super().compute_loss(model, inputs, num_items_in_batch)
        replay, replay_labels = self.draw_replay(task.config.replay_batch_size)
        return self.names_only.compute_loss(
            model, inputs, task.config, self.teacher, replay, replay_labels, self.num_old, self.weights,
            self.config.replay.l_ft, self.config.replay.ft_detach, self.generator, self.unwrapped_model,
            self.replay_block, self.config.replay.teacher_text)

    # ----- between tasks ---------------------------------------------------------------------------
    def after_task(self, task_id: int) -> dict:
        task = self.tasks[task_id]
        model = self.unwrapped_model
        train_contrastive = self.config.sampling.selection == "cfs"  # g_c only serves CFS
        if is_names_only(task):
            report = self.names_only.finish(model, self.bank, task, train_contrastive, self.args.seed, self.replay_block,
                                            self.config.selection.contrastive_kwargs())
            return {**report, **self.synthesize(task.class_ids)}
        model.eval()
        stats, features = collect_statistics_and_features(model, self.real_batches(task.train), self.show_progress)
        if self.previous_statistics is not None:  # replay.statistics_model "previous"
            stats, self.previous_statistics = self.previous_statistics, None
        elif self.config.replay.statistics_crop < 1:
            stats = collect_layer_statistics(model, (x for x, _ in self.statistics_batches(task, task_id)))
        self.bank.update_statistics(stats)
        self.bank.add_classes(task.class_ids, features, train_contrastive=train_contrastive, seed=self.args.seed,
                              progress=self.show_progress, **self.config.selection.contrastive_kwargs())
        self.names_only.record_raw(model, self.bank, task, self.statistics_batches(task, task_id))
        return self.synthesize(task.class_ids)

    def statistics_batches(self, task, task_id: int):
        """The task's real batches as layer statistics see them (``replay.statistics_crop``: random resized crops)."""
        return cropped_batches(self.real_batches(task.train), self.config.replay.statistics_crop,
                               task_seed(self.args.seed, task_id))

    def synthesize(self, new_classes: list[int] | None = None) -> dict:
        """Bring the replay buffer up to every class in the bank: invert `new_classes` (with
        ``buffer.incremental``; else, or with no buffer yet, every class) and, with
        ``buffer.refresh_steps``, refine the kept samples of the other classes under the current model."""
        cfg = self.config.buffer
        model = self.unwrapped_model
        seconds = passes = 0.0
        if not cfg.incremental or self.buffer is None or new_classes is None:
            classes, self.buffer, self.buffer_targets = list(range(self.bank.num_classes)), None, None
        else:
            classes = [int(c) for c in new_classes]
            if cfg.refresh_steps and len(self.buffer[1]):
                refreshed = invert(model, self.buffer_targets, self.bank.statistics,
                                   dataclasses.replace(self.inversion, refine_steps=cfg.refresh_steps, refine_t_max=0),
                                   mode="refresh", init=self.buffer[0], progress=self.show_progress)
                self.buffer = (refreshed.samples.to(DTYPES[cfg.dtype]), self.buffer[1])
                seconds, passes = refreshed.report["seconds"], refreshed.report["full_model_passes"]
        samples, labels, targets, report = synthesize_replay(
            model, self.bank, classes, self.inversion, self.config.sampling, self.config.selection,
            mode=self.mode, shuffle=cfg.shuffle, accelerator=self.trainer.accelerator, progress=self.show_progress,
        )
        samples = samples.to(DTYPES[cfg.dtype])  # kept (and saved) at this precision, so a resumed run replays the same
        if self.buffer is not None:
            samples, labels = torch.cat([self.buffer[0], samples]), torch.cat([self.buffer[1], labels])
            targets = torch.cat([self.buffer_targets, targets])
        self.buffer, self.buffer_targets = (samples, labels), targets
        self.last_report = {k: v for k, v in report.items() if k != "curve"}
        return {
            "inversion_seconds": report["seconds"] + seconds,
            "inversion_full_model_passes": report["full_model_passes"] + passes,
            "inversion_feature_mse": report.get("final_feature_mse", float("nan")),
            "inverted_classes": len(classes),
        }

    # ----- checkpoint --------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        self.bank.save_pretrained(os.path.join(folder, FOLDER_NAME))
        if self.buffer is not None:
            save_buffer(os.path.join(folder, BUFFER_NAME), *self.buffer, self.buffer_targets, self.replay_block)
        super().save(folder)  # the replay grid

    def load(self, folder: str) -> None:
        self.bank = FeatureBank.from_pretrained(os.path.join(folder, FOLDER_NAME))
        if any(is_names_only(t) for t in self.tasks):
            check_bank(self.bank, folder)  # before the inversion work below
        path = os.path.join(folder, BUFFER_NAME)
        if not os.path.isfile(path):  # a checkpoint of hf_pmi 0.1 keeps no buffer: invert every class, data-free
            logger.info("%s has no %s: inverting the replay samples of its %d classes.", folder, BUFFER_NAME,
                        self.bank.num_classes)
            self.synthesize()
            return
        samples, labels, targets, block = load_buffer(path, self.args.device)
        if block != self.replay_block:
            raise ValueError(
                f"{path} holds samples entering vision block {block}, but this run replays at block "
                f"{self.replay_block}: continue with --inversion_start_block {block} (and its LoRA restriction)."
            )
        if labels.unique().tolist() != list(range(self.bank.num_classes)):
            raise ValueError(f"{path} holds samples of classes {labels.unique().tolist()}, but the feature bank of "
                             f"{folder} has {self.bank.num_classes} classes: the files come from different checkpoints.")
        self.buffer, self.buffer_targets = (samples, labels), targets

    def card_info(self) -> dict:
        info = {"settings": {f"{part}.{f.name}": getattr(getattr(self.config, part), f.name)
                             for part in ("replay", "buffer") for f in dataclasses.fields(getattr(self.config, part))}}
        inversion = {"mode": self.mode, **{k: getattr(self.inversion, k) for k in CARD_INVERSION_KEYS},
                     "per_class": self.config.sampling.per_class, "selection": self.config.sampling.selection,
                     "a_layer": self.inversion.layer_weight(VisionBlocks(self.model).num_blocks)}
        if self.mode == "pmi":
            inversion.pop("full_steps")
        if self.last_report is not None:
            inversion.update(seconds=self.last_report["seconds"], full_model_passes=self.last_report["full_model_passes"])
        info["inversion"] = inversion
        task = self.tasks[self.task_id] if self.task_id is not None else None
        if task is not None and is_names_only(task):  # the names-only task's own settings
            info["settings"].update({f"names_only.{k}": v for k, v in dataclasses.asdict(task.config).items()
                                     if k != "preset" or v})
        info["names_only_classes"] = list(self.bank.names_only_classes)
        return info


@register_method("full_inversion", config=PMIConfig)
class FullInversion(PMI):
    """Same losses and buffer, inverted from a random start by full-model steps only; unless
    ``inversion.full_steps`` is set, with the budget of one PMI chunk (equal compute)."""

    mode = "full"

    def resolve_inversion(self, config: InversionConfig) -> InversionConfig:
        config = super().resolve_inversion(config)
        return dataclasses.replace(config, full_steps=full_steps(VisionBlocks(self.model), config))
