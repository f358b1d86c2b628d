"""`pmi` (the paper's method) and `full_inversion` (its DeepInversion-style baseline).

Between tasks: layer statistics and class Gaussians (+ contrastive models) of the new classes go
into the `FeatureBank`; a replay buffer of ``sampling.per_class`` inverted patch maps per seen
class is synthesised (`hf_pmi.synthesis`). During the next task every real batch is joined by
``replay.batch_size`` replayed samples and trained with the replay losses against a frozen teacher
(`hf_pmi.methods.rehearsal`). Tasks given by class names only are learned through
`hf_pmi.names_only.NamesOnlyLearner`.

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

from ..bank import FOLDER_NAME, FeatureBank, SamplingConfig
from ..blocks import VisionBlocks
from ..contrastive import SelectionConfig
from ..data import TaskPlan
from ..inversion import InversionConfig, full_steps
from ..names_only import NamesOnlyLearner, check_bank, is_names_only, validate_tasks
from ..replay import ReplayConfig
from ..statistics import collect_statistics_and_features
from ..synthesis import synthesize_replay
from .base import MethodConfig, register_method
from .rehearsal import ReplayMethod

CARD_INVERSION_KEYS = ("preset", "start_block", "layer_steps", "first_block_steps", "refine_steps", "alpha_rf",
                       "alpha_tv", "full_steps")


@dataclass
class PMIConfig(MethodConfig):
    """Settings of `pmi` and `full_inversion`: replay training, inversion, replay targets and CFS."""

    replay: ReplayConfig = field(default_factory=ReplayConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)


@register_method("pmi", config=PMIConfig)
class PMI(ReplayMethod):
    """Per-layer model inversion replay (Tong et al., NeurIPS 2025)."""

    mode = "pmi"
    learns_from_names = True

    def __init__(self, trainer, config: PMIConfig | None = None):
        super().__init__(trainer, config)
        self.inversion = self.resolve_inversion(self.config.inversion)
        self.bank = FeatureBank()
        self.last_report: dict | None = None
        self.plan: TaskPlan | None = None
        self.names_only = NamesOnlyLearner.for_run(trainer.model, trainer.tasks, trainer.args.device)

    def resolve_inversion(self, config: InversionConfig) -> InversionConfig:
        """The inversion settings of this run (module docstring)."""
        return dataclasses.replace(config, seed=config.seed if config.seed is not None else self.args.seed)

    def validate(self) -> None:
        if self.inversion.start_block != 1:
            raise ValueError(
                "Replay training feeds samples after the patch embedding, so the inversion must produce patch maps: "
                f"set inversion_start_block=1 (got {self.inversion.start_block}). Pixel inversion (0) is for "
                "`hf_pmi.inversion.invert` directly."
            )
        if any(is_names_only(t) for t in self.tasks):
            validate_tasks(self.tasks, self.unwrapped_model)

    # ----- training ----------------------------------------------------------------------------
    def before_task(self, task_id: int) -> None:
        super().before_task(task_id)
        task = self.tasks[task_id]
        self.plan = None
        if is_names_only(task):
            self.plan = self.names_only.prepare(
                self.unwrapped_model, self.bank, task, self.trainer.processing_class.tokenizer, self.inversion,
                self.mode, self.args.seed, task_id, self.show_progress)

    def plan_task(self, task_id: int) -> TaskPlan:
        return self.plan if self.plan is not None else super().plan_task(task_id)

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        task = self.tasks[self.task_id]
        if self.teacher is None or not is_names_only(task):
            return super().compute_loss(model, inputs, num_items_in_batch)
        replay, replay_labels = self.draw_replay()
        return self.names_only.compute_loss(
            model, inputs, task.config, self.teacher, replay, replay_labels, self.num_old, self.weights,
            self.config.replay.l_ft, self.config.replay.ft_detach, self.generator, self.unwrapped_model)

    # ----- between tasks ---------------------------------------------------------------------------
    def after_task(self, task_id: int) -> dict:
        task = self.tasks[task_id]
        model = self.unwrapped_model
        train_contrastive = self.config.sampling.selection == "cfs"  # g_c only serves CFS
        if is_names_only(task):
            report = self.names_only.finish(model, self.bank, task, train_contrastive, self.args.seed)
            return {**report, **self.synthesize()}
        model.eval()
        stats, features = collect_statistics_and_features(model, self.real_batches(task.train), self.show_progress)
        self.bank.update_statistics(stats)
        self.bank.add_classes(task.class_ids, features, train_contrastive=train_contrastive, seed=self.args.seed,
                              progress=self.show_progress)
        self.names_only.record_raw(model, self.bank, task, self.real_batches(task.train))
        return self.synthesize()

    def synthesize(self) -> dict:
        """Regenerate the replay buffer for every class in the bank."""
        samples, labels, report = synthesize_replay(
            self.unwrapped_model, self.bank, list(range(self.bank.num_classes)), self.inversion,
            self.config.sampling, self.config.selection, mode=self.mode, accelerator=self.trainer.accelerator,
            progress=self.show_progress,
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
        self.bank.save_pretrained(os.path.join(folder, FOLDER_NAME))
        super().save(folder)  # the replay grid

    def load(self, folder: str) -> None:
        self.bank = FeatureBank.from_pretrained(os.path.join(folder, FOLDER_NAME))
        if any(is_names_only(t) for t in self.tasks):
            check_bank(self.bank, folder)  # before the inversion work below
        self.synthesize()  # the buffer is not stored: it is regenerated, data-free, from the bank

    def card_info(self) -> dict:
        replay = self.config.replay
        info = {"settings": {f"replay.{f.name}": getattr(replay, f.name) for f in dataclasses.fields(replay)}}
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
