"""`NamesOnlyLearner`: how a replay method learns a names-only task, through a narrow interface.

The method calls, with explicit arguments (the learner never touches the trainer):

- `record_raw` after each task learned from images: the raw CLIP's Gaussians and layer statistics of
  its classes go into the feature bank (the material names are later projected from);
- `prepare` before a names-only task: projection (`project`, `hf_pmi.names_only.projection`),
  inversion through the raw CLIP, and how the new classes are scored at inference (``scoring``,
  `route_names`); returns the `TaskPlan` the trainer applies for this task only (the inverted samples,
  repeated ``repeats`` times an epoch, their collator, the task's learning rate, epochs, warm-up,
  schedule and batch size);
- `compute_loss` during that task: the replay losses with the inverted samples in place of real
  images (the task's own distillation weights and teacher text where set), plus the boundary
  distillation;
- `finish` after it: the new classes' Gaussians (from their inverted samples) go into the bank.

The names-only task trains on inverted maps of the new classes (normalised-feature MSE through the
raw CLIP, no TV, refinement lr 0.1; statistics weights ``a_layer`` 0.02 or the reference's
``open_rf``) with the replay losses (local CE on the new classes, distillation and balancing CE on
the old replay), lr 5e-4. Beyond the reference (`NamesOnlyConfig`, measured in docs/names_only.md):
the balancing CE also trains the image tower, a boundary distillation (`boundary_target`) teaches
the model, on maps mixed between new samples and old replay, the raw CLIP's split between old and
new names, and at inference the new classes are scored with the raw CLIP too (`hf_pmi.routing`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
import torch.nn.functional as F

from ..blocks import VisionBlocks, unwrap_clip
from ..data import TaskPlan
from ..inversion import InversionConfig, invert
from ..modeling import ContinualCLIPOutput
from ..replay import replay_losses, task_weights
from ..seeding import names_only_inversion_seed, task_seed
from ..statistics import collect_statistics_and_features, eval_mode
from .config import NamesOnlyConfig
from .projection import boundary_target, project_name, raw_text_prototypes, text_space_prototypes
from .tasks import check_names, is_names_only


class MapDataset(torch.utils.data.Dataset):
    """Inverted patch maps of the new classes with their labels (the names-only task's training set),
    each sample `repeats` times per epoch (the reference's open-set data set repeats them ten times)."""

    def __init__(self, maps: torch.Tensor, labels: torch.Tensor, repeats: int = 1):
        self.maps, self.labels, self.repeats = maps.detach().cpu(), labels.cpu(), int(repeats)

    def __len__(self) -> int:
        return len(self.labels) * self.repeats

    def __getitem__(self, i):
        i = i % len(self.labels)
        return {"new_patch_maps": self.maps[i], "labels": self.labels[i]}


def stack_maps(rows) -> dict[str, torch.Tensor]:
    """The collator of `MapDataset` rows."""
    return {"new_patch_maps": torch.stack([r["new_patch_maps"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows])}


@contextlib.contextmanager
def raw_clip(model, snapshot=None):
    """The raw (pre-trained) CLIP of a `ContinualCLIP`: ``snapshot`` if given (a copy taken before
    training), else the model with its adapters disabled (`ContinualCLIP.raw_clip`)."""
    if snapshot is not None:
        yield snapshot
    else:
        with model.raw_clip() as clip:
            yield clip


def check_bank(bank, where: str) -> None:
    """A continued checkpoint's bank must hold raw-CLIP Gaussians of every class."""
    if bank.num_raw_classes < bank.num_classes or bank.raw_statistics is None:
        raise ValueError(
            f"The feature bank of {where} has raw-CLIP Gaussians for {bank.num_raw_classes} of its "
            f"{bank.num_classes} classes{'' if bank.raw_statistics is not None else ' and no raw-CLIP layer statistics'}, "
            "so new classes cannot be projected from them. Banks written by hf_pmi's `pmi` method on a LoRA-adapted "
            "CLIP record them after every task: retrain (or continue) that run with this version, or add them with "
            "`hf_pmi.names_only.record_raw_gaussians(model, bank, class_ids, batches)` from the old classes' images."
        )


def record_raw_gaussians(model, bank, class_ids, batches, snapshot=None) -> None:
    """Add the raw-CLIP Gaussians and layer statistics of `class_ids` from ``(pixels, labels)`` batches."""
    with raw_clip(model, snapshot) as clip:
        stats, features = collect_statistics_and_features(clip, batches)
    bank.update_raw_statistics(stats)
    bank.add_raw_classes(class_ids, features)


def validate_tasks(tasks, model) -> None:
    """Errors before any work for the names-only tasks of `tasks` learned by `model` (a `ContinualCLIP`)."""
    known = list(model.class_names[: tasks.label_offset])
    for t in tasks:
        if is_names_only(t):
            check_names(t.class_names)
            if t.class_ids[0] == 0:
                raise ValueError(
                    f"Task {t.task_id} {t.class_names} is names-only but no class is known before it: a new name is "
                    "projected from the image features of old classes, so learn at least one task with images first."
                )
        clash = sorted(set(t.class_names) & set(known))
        if clash:
            raise ValueError(f"Class name(s) {clash} of task {t.task_id} already exist: name new classes only.")
        known += t.class_names
    if tasks.label_offset > 0 and not model.has_adapters:  # a continued model keeps no copy of its raw CLIP
        with model.raw_clip():  # raises, naming the fix
            pass


def inversion_config(base: InversionConfig, config: NamesOnlyConfig) -> InversionConfig:
    """The inversion of projected features: the run's settings, with those the names-only path sets
    (normalised-feature MSE, `config`'s refinement lr and TV weight, and its statistics weights: with
    ``open_rf`` the reference's, a per-layer weight of open_rf x number of blocks and a refinement KL
    weight of open_rf; else ``a_layer`` and the run's refinement KL weight).

    Example:
        >>> c = inversion_config(InversionConfig(), NamesOnlyConfig(open_rf=0.02))
        >>> round(c.layer_weight(num_blocks=15), 6), c.alpha_rf, c.alpha_tv, c.refine_lr, c.normalize_features
        (0.3, 0.02, 0.0, 0.1, True)
        >>> c = inversion_config(InversionConfig(), NamesOnlyConfig())
        >>> c.layer_weight(num_blocks=15), c.alpha_rf
        (0.02, 0.002)
    """
    weights = (dict(a_layer=None, alpha_rf=config.open_rf) if config.open_rf is not None
               else dict(a_layer=config.a_layer))
    return dataclasses.replace(base, normalize_features=True, refine_lr=config.refine_lr, alpha_tv=config.alpha_tv,
                               **weights)


def name_prototypes(projected: torch.Tensor, per_class: int, old_means: torch.Tensor,
                    old_text: torch.Tensor) -> torch.Tensor:
    """Class embeddings (N, P) of N names-only classes in the raw CLIP's classifier from their projected
    targets (N * per_class, P, class by class): the mean of each class's, the modality gap taken off
    (`text_space_prototypes`)."""
    return text_space_prototypes(projected.view(-1, per_class, projected.shape[-1]).mean(1), old_means, old_text)


def route_names(model, class_ids: list[int], prototypes: torch.Tensor, scoring: str) -> None:
    """Score `class_ids` of a LoRA `model` at inference as `scoring` says ('route' or 'product', with
    `prototypes` as their class embeddings in the raw CLIP; 'adapted': nothing to do)."""
    if scoring == "adapted":
        return
    if len(model.router) and model.router.combine != scoring:
        raise ValueError(f"The model already combines its routed classes {model.routed_classes} by "
                         f"{model.router.combine!r}; it cannot also use {scoring!r}.")
    model.route_classes(class_ids, prototypes)
    model.router.combine = scoring


def names_only_weights(weights: dict, config: NamesOnlyConfig, num_old: int, num_new: int) -> dict:
    """The run's task weights (`hf_pmi.replay.task_weights`) with the names-only task's own ``l_hkd`` /
    ``l_tkd`` where set, task-weighted the same way (alpha * beta).

    Example:
        >>> w = names_only_weights({"ce": 2.0, "hkd": 0.1, "tkd": 0.2}, NamesOnlyConfig(l_hkd=0.0, l_tkd=1.0), 2, 2)
        >>> w["ce"], w["hkd"], w["tkd"]
        (2.0, 0.0, 1.0)
    """
    factors = task_weights(num_old, num_new, 1.0, 1.0, 1.0)
    weights = dict(weights)
    for term in ("hkd", "tkd"):
        value = getattr(config, f"l_{term}")
        if value is not None:
            weights[term] = value * factors[term]
    return weights


class NamesOnlyLearner:
    """Names-only tasks for a replay method (module docstring). `snapshot` is a frozen copy of the
    pre-trained CLIP, needed only when the model has no adapters to disable (`needs_snapshot`)."""

    def __init__(self, snapshot=None):
        self.snapshot = snapshot
        self.data: MapDataset | None = None
        self.report: dict = {}

    @staticmethod
    def needs_snapshot(model, tasks) -> bool:
        """A model trained whole loses its pre-trained weights: names-only tasks then need a copy of them."""
        return any(is_names_only(t) for t in tasks) and not model.has_adapters

    @classmethod
    def for_run(cls, model, tasks, device) -> "NamesOnlyLearner":
        """A learner for `tasks` on `model`, with a frozen copy of its CLIP when `needs_snapshot`."""
        if not cls.needs_snapshot(model, tasks):
            return cls()
        snapshot = copy.deepcopy(unwrap_clip(model.clip)).eval().requires_grad_(False)
        return cls(snapshot.to(device))

    def raw_available(self, model) -> bool:
        return self.snapshot is not None or model.has_adapters

    def record_raw(self, model, bank, task, batches) -> None:
        """Record the raw Gaussians of a task learned from images (when the raw CLIP is available)."""
        if self.raw_available(model) and bank.num_raw_classes == task.class_ids[0]:
            record_raw_gaussians(model, bank, task.class_ids, batches, self.snapshot)

    def project(self, model, bank, task, tokenizer, seed: int, task_id: int) -> torch.Tensor:
        """The projected targets (n * per_class, P) of the names-only `task` (class by class) in the raw
        CLIP's feature space; sets ``raw_text``, the raw CLIP's classifier over old and new classes."""
        cfg = task.config
        n_old = task.class_ids[0]
        new_ids, new_mask = model.tokenize_classes(task.class_names, tokenizer)
        with raw_clip(model, self.snapshot) as clip:
            old = raw_text_prototypes(clip, model.prompt_ids[:n_old], model.prompt_mask[:n_old]).cpu()
            new = raw_text_prototypes(clip, new_ids, new_mask).cpu()
        self.raw_text = torch.cat([old, new])
        generator = torch.Generator().manual_seed(task_seed(seed, task_id))
        return torch.cat([
            project_name(bank.raw_means[:n_old], bank.raw_stds[:n_old], old, new[j], cfg.neighbours, cfg.per_class,
                         cfg.gamma, generator)
            for j in range(len(task.class_names))
        ])

    def prepare(self, model, bank, task, tokenizer, inversion: InversionConfig, mode: str, seed: int, task_id: int,
                progress: bool, batch_size: int = 32, num_processes: int = 1) -> TaskPlan:
        """Project, invert (`mode` as the method inverts) and route the names-only `task`; returns what the
        trainer trains on (`batch_size`: the run's per-process batch, which the task's schedule is computed
        with unless the task sets its own)."""
        cfg = task.config
        check_bank(bank, "this run")
        n_old = task.class_ids[0]
        targets = self.project(model, bank, task, tokenizer, seed, task_id)
        labels = torch.tensor(task.class_ids).repeat_interleave(cfg.per_class)
        with raw_clip(model, self.snapshot) as clip:
            result = invert(clip, targets, bank.raw_statistics, inversion_config(inversion, cfg), mode=mode,
                            seed=names_only_inversion_seed(seed, task_id), progress=progress)
        if model.has_adapters:  # from now on, evaluations score the new names as `scoring` says
            route_names(model, task.class_ids, name_prototypes(targets, cfg.per_class, bank.raw_means[:n_old],
                                                                self.raw_text[:n_old]), cfg.scoring)
        self.data = MapDataset(result.samples, labels, cfg.repeats)
        self.report = {"names_only_inversion_seconds": result.report["seconds"],
                       "names_only_feature_mse": result.report["final_feature_mse"]}
        overrides = cfg.training_overrides(len(self.data), cfg.batch_size or batch_size, num_processes)
        return TaskPlan(self.data, collator=stack_maps, overrides=overrides)

    def compute_loss(self, model, inputs, config: NamesOnlyConfig, teacher, replay, replay_labels, num_old: int,
                     weights: dict, l_ft: float, ft_detach: bool, generator, unwrapped_model, block: int = 1,
                     teacher_text: str = "teacher"):
        """Replay losses with the inverted new-class samples in place of real images, plus the boundary
        distillation; new samples, replay and mixed samples (inputs of vision block `block`) share one
        forward pass (one DDP forward). `l_ft`, `ft_detach`, `teacher_text` and the distillation weights
        in `weights` are the run's, unless `config` sets its own (``l_hkd`` / ``l_tkd`` task-weighted
        as the run's)."""
        new_maps = inputs["new_patch_maps"]
        replay = replay.to(new_maps.dtype)
        mixed = self.mix(new_maps, replay, generator) if config.boundary_kd > 0 else new_maps[:0]
        out = model(replay_inputs=torch.cat([new_maps, replay, mixed]), replay_block=block)
        n, r = new_maps.shape[0], replay.shape[0]
        split = ContinualCLIPOutput(logits=out.replay_logits[:n], replay_logits=out.replay_logits[n:n + r],
                                    image_embeds=out.replay_image_embeds[:n],
                                    replay_image_embeds=out.replay_image_embeds[n:n + r],
                                    text_embeds=out.text_embeds, logit_scale=out.logit_scale)
        with torch.no_grad():  # one teacher pass for the replay and the mixed maps
            teacher_out = teacher(replay_inputs=torch.cat([replay, mixed]), replay_block=block)
        teacher_mixed = teacher_out.replay_logits[r:].float()
        teacher_out.replay_logits = teacher_out.replay_logits[:r]
        l_ft = l_ft if config.l_ft is None else config.l_ft
        ft_detach = ft_detach if config.ft_detach is None else config.ft_detach
        teacher_text = teacher_text if config.teacher_text is None else config.teacher_text
        weights = names_only_weights(weights, config, num_old, int(split.text_embeds.shape[0]) - num_old)
        terms = replay_losses(split, teacher_out, inputs["labels"], replay_labels, num_old, weights, l_ft, ft_detach,
                              teacher_text)
        if config.boundary_kd > 0:
            t = config.boundary_kd_temperature
            target = self.boundary_target_of(unwrapped_model, mixed, teacher_mixed, t, num_old, block)
            student = F.log_softmax(out.replay_logits[n + r:].float() / t, -1)
            terms["boundary_kd"] = config.boundary_kd * F.kl_div(student, target, reduction="batchmean") * t * t
        return sum(terms.values())

    @staticmethod
    def mix(new_maps, replay, generator):
        """Samples mixed at a random ratio between each new-class sample and a random replayed one:
        samples near the boundary of a new class and old ones."""
        partner = replay[torch.randint(len(replay), (new_maps.shape[0],), generator=generator).to(replay.device)]
        shape = (new_maps.shape[0],) + (1,) * (new_maps.dim() - 1)
        lam = torch.rand(shape, generator=generator).to(new_maps.device)
        return lam * new_maps + (1 - lam) * partner

    @torch.no_grad()
    def boundary_target_of(self, model, mixed, old_logits, temperature, num_old, block: int = 1):
        """`boundary_target` of mixed maps: the raw CLIP (over old and new names) and the model before
        the task (its logits ``old_logits`` over the old classes), at `temperature`. Where the two
        disagree is where the adapted model has lost the raw CLIP's knowledge of the new names."""
        with raw_clip(model, self.snapshot) as clip:
            raw = F.normalize(VisionBlocks(clip).forward_from(block, mixed).float(), dim=-1)
            raw_logits = unwrap_clip(clip).logit_scale.exp() * raw @ self.raw_text.to(raw.device).t()
        return boundary_target(raw_logits / temperature, old_logits / temperature, num_old)

    def finish(self, model, bank, task, train_contrastive: bool, seed: int, block: int = 1,
               contrastive_kwargs: dict | None = None) -> dict:
        """Put the new classes into the bank from their inverted samples (inputs of vision block `block`;
        `contrastive_kwargs`: how their contrastive models train, `FeatureBank.add_classes`); returns the
        task's report."""
        maps, labels = self.data.maps, self.data.labels
        device = VisionBlocks(model).embeddings.patch_embedding.weight.device
        with torch.no_grad(), raw_clip(model, self.snapshot) as clip:
            raw = VisionBlocks(clip).forward_from(block, maps.to(device)).float().cpu()
        with torch.no_grad(), eval_mode(model):
            feats = VisionBlocks(model).forward_from(block, maps.to(device)).float().cpu()
        per_class = {c: feats[labels == c] for c in task.class_ids}
        bank.add_classes(task.class_ids, per_class, train_contrastive=train_contrastive, seed=seed,
                         **(contrastive_kwargs or {}))
        bank.add_raw_classes(task.class_ids, {c: raw[labels == c] for c in task.class_ids})
        bank.names_only_classes += list(task.class_ids)
        self.data = None
        return self.report
