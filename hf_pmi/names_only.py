"""New classes from their names alone: semantic-aware projection (method.md, "new classes from names only").

A names-only class has no image. Its pseudo image features are built in the raw (pre-trained,
adapter-free) CLIP's feature space from old classes that are close in meaning:

1. text prototypes: ``a_k`` of each old class, ``b`` of the new name, each the L2-normalised mean of
   the raw CLIP's normalised text features over the model's prompt templates;
2. the ``K`` old classes with the highest cosine ``a_k . b``;
3. ``m`` samples of each neighbour's raw-feature Gaussian, L2-normalised and rotated from ``a_k`` to
   ``b`` in the plane the two span (`rotate_toward`);
4. the average over the neighbours (matched by sample index), normalised and shifted toward the text
   prototype: ``t = norm((1 - gamma) * avg + gamma * b)``.

The targets are inverted through the raw CLIP (normalised-feature MSE, ``a_layer`` 0.02, no TV,
refinement lr 0.1) to patch maps, and the new classes are trained on them with the replay losses
(local CE on the new classes, distillation and balancing CE on the old replay), lr 5e-4. Beyond the
reference (`NamesOnlyConfig`, measured in docs/names_only.md): the balancing CE also trains the image
tower, and a boundary distillation (`boundary_target`) teaches the model, on maps mixed between new
samples and old replay, the raw CLIP's split between old and new names: an adapted model loses
much of its zero-shot knowledge of names it was never trained on, the raw CLIP keeps it.

Routing (``route``, beyond the reference): the trained model learns little of that boundary from
inverted maps (docs/names_only.md), so at inference a LoRA model scores its names-only classes with
the raw CLIP, each with the mean of its projected features (modality gap taken off,
`text_space_prototypes`) for class embedding, and splits the rest among the other classes as the
adapted model does (`routed_probs`, `ContinualCLIP.route_classes`).

Use: a `ContinualTasks` whose task is a `NamesOnlyTask` (`names_only_tasks(names)`, or
`make_names_only(tasks, task_ids)` to drop a split's training images), with ``method="pmi"``.
`ContinualTrainer.from_pretrained(repo, tasks=["purple ring"], ...)` adds classes by name to a
checkpoint, data-free.

Example (the projection maths):
    >>> import torch
    >>> a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    >>> rotate_toward(a[None], a, b)
    tensor([[0., 1., 0.]])
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .blocks import VisionBlocks, unwrap_clip
from .data import ContinualTask, ContinualTasks
from .modeling import class_text_embeddings

BOUNDARY_KD = 1.0  # measured on the shapes world (docs/names_only.md)


# The reference's names-only training, as the values of the settings where hf_pmi's defaults differ
# (measured on the shapes world, docs/names_only.md). `NamesOnlyConfig(preset="reference")` applies them.
REFERENCE_PRESET = {
    "num_train_epochs": 3.0,  # reference: 1-5 epochs
    "l_ft": None,  # the run's balancing CE (reference 0.001-0.1, image features detached)
    "ft_detach": None,
    "boundary_kd": 0.0,  # no distillation from the raw CLIP
    "route": False,  # the trained model alone scores the new classes
}


@dataclass
class NamesOnlyConfig:
    """Settings of learning classes from names. The projection and inversion settings are the
    reference's; the training differs where measured better (docs/names_only.md): a balancing CE
    that also trains the image tower, and a distillation from the raw CLIP on samples mixed between
    new and old classes. ``preset="reference"`` gives the reference's training.

    Example:
        >>> NamesOnlyConfig().boundary_kd > 0, NamesOnlyConfig(preset="reference").boundary_kd
        (True, 0.0)
    """

    preset: str = field(
        default="",
        metadata={"help": "'reference': the reference's names-only training (fields given explicitly keep their "
                  "value). '': hf_pmi's defaults."},
    )
    neighbours: int = field(default=5, metadata={"help": "K: old classes projected from (reference 5)."})
    per_class: int = field(default=20, metadata={"help": "m: samples per neighbour, and targets per new class (reference 20)."})
    gamma: float = field(default=0.1, metadata={"help": "Shift of the projected feature toward the text prototype (reference 0.1)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of the names-only task (reference 5e-4)."})
    num_train_epochs: float = field(
        default=10.0, metadata={"help": "Epochs over the inverted samples (reference 1-5; 60 samples at batch 32 make 2 steps an epoch)."}
    )
    warmup_steps: float = field(
        default=0, metadata={"help": "Warm-up steps of the names-only task: a few dozen samples make only a few steps."}
    )
    a_layer: float = field(default=0.02, metadata={"help": "Statistics weight of the per-layer inversion (reference 0.02)."})
    refine_lr: float = field(default=0.1, metadata={"help": "Learning rate of the full-model refinement (reference 0.1)."})
    alpha_tv: float = field(default=0.0, metadata={"help": "Total variation weight (reference: no TV)."})
    l_ft: float | None = field(
        default=1.0,
        metadata={"help": "Weight of the balancing CE over all classes, on the new samples and the old replay, in this "
                  "task (None: the run's `l_ft`, as the reference). It keeps old images away from the new names."},
    )
    ft_detach: bool | None = field(
        default=False, metadata={"help": "Detach image features in that CE (None: the run's `ft_detach`; reference True)."}
    )
    boundary_kd: float = field(
        default=BOUNDARY_KD,
        metadata={"help": "Weight of the boundary distillation (beyond the reference, 0: off): on patch maps mixed "
                  "between new samples and old replay, the model learns the raw CLIP's split between old and new "
                  "names and the previous model's split among the old ones."},
    )
    boundary_kd_temperature: float = field(default=2.0, metadata={"help": "Temperature of that distillation."})
    route: bool = field(
        default=True,
        metadata={"help": "Score this task's classes at inference with the raw CLIP and the mean of their projected "
                  "features, the rest split by the trained model (`routed_probs`; beyond the reference; a LoRA "
                  "model only: it costs a second pass through the vision tower). False: the trained model alone, "
                  "as the reference."},
    )

    def __post_init__(self):
        if self.preset not in ("", "reference"):
            raise ValueError(f"NamesOnlyConfig.preset must be '' or 'reference', got {self.preset!r}.")
        if self.preset:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, value in REFERENCE_PRESET.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)


@dataclass
class NamesOnlyTask(ContinualTask):
    """A task given by class names only: ``train`` is None; ``test`` may hold real images to evaluate on."""

    config: NamesOnlyConfig = field(default_factory=NamesOnlyConfig)


def is_names_only(task) -> bool:
    return isinstance(task, NamesOnlyTask)


def check_names(names) -> list[str]:
    """Class names as a list of non-empty, distinct strings (raises `ValueError` naming the problem)."""
    if isinstance(names, str):
        raise ValueError(f"Give class names as a list, e.g. [{names!r}], not a single string.")
    names = list(names)
    if not names:
        raise ValueError("A names-only task needs at least one class name.")
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"Class names must be non-empty strings; got {n!r} in {names}.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Class name(s) {dup} appear more than once in {names}.")
    return names


def names_only_tasks(names, test=None, config: NamesOnlyConfig | None = None, label_column: str = "label",
                     image_column: str = "image") -> ContinualTasks:
    """One names-only task of `names`. `test` (optional) is a dataset whose `ClassLabel` names include
    `names`; its rows of these classes are used to evaluate the task."""
    names = check_names(names)
    order = list(range(len(names)))
    test_part = None
    if test is not None:
        from .data import _select_classes

        label_names = list(test.features[label_column].names)
        missing = [n for n in names if n not in label_names]
        if missing:
            raise ValueError(f"The test data has no class(es) {missing}; its classes are {label_names}.")
        order = [label_names.index(n) for n in names]
        test_part = _select_classes(test, label_column, order)
    task = NamesOnlyTask(task_id=0, class_ids=list(range(len(names))), class_names=names, train=None, test=test_part,
                         config=config or NamesOnlyConfig())
    return ContinualTasks(tasks=[task], class_order=order, class_names=names, image_column=image_column,
                          label_column=label_column, metadata={"names_only": True})


def make_names_only(tasks: ContinualTasks, task_ids=(-1,), config: NamesOnlyConfig | None = None) -> ContinualTasks:
    """`tasks` with the tasks `task_ids` turned names-only: their training images are dropped, their
    test images kept (the last task by default, as in the reference)."""
    chosen = {i % len(tasks) for i in task_ids}
    new = [
        NamesOnlyTask(t.task_id, t.class_ids, t.class_names, None, t.test, config or NamesOnlyConfig())
        if i in chosen else t
        for i, t in enumerate(tasks.tasks)
    ]
    return dataclasses.replace(tasks, tasks=new)


# ----- the raw CLIP -------------------------------------------------------------------------------
def has_adapters(model) -> bool:
    from peft import PeftModel

    return isinstance(model.clip, PeftModel)


@contextlib.contextmanager
def raw_clip(model, snapshot=None):
    """The raw (pre-trained) CLIP of a `ContinualCLIP`: ``snapshot`` if given (a copy taken before
    training), else the model with its peft adapters disabled (a model without adapters is refused:
    its pre-trained weights are gone)."""
    if snapshot is not None:
        yield snapshot
    elif has_adapters(model):
        with model.clip.disable_adapter():
            yield model.clip
    else:
        raise ValueError(
            "Names-only classes need the raw pre-trained CLIP, but this model was trained without adapters, so "
            "its pre-trained weights are gone. Train with LoRA (`ContinualCLIP.from_clip(clip, lora=LoraConfig(...))`)."
        )


@torch.no_grad()
def raw_text_prototypes(clip, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """(C, P) class embeddings of the raw CLIP (`hf_pmi.modeling.class_text_embeddings`), float, on its device."""
    device = unwrap_clip(clip).logit_scale.device
    return class_text_embeddings(clip, prompt_ids.to(device), prompt_mask.to(device)).float()


def prompts_for(model, names: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised prompts (C, T, L) of `names` with the model's templates (as `add_classes` makes them)."""
    length = model.prompt_ids.shape[-1]
    texts = [t.format(n) for n in names for t in model.templates]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    shape = (len(names), len(model.templates), length)
    return enc["input_ids"].view(shape), enc["attention_mask"].view(shape)


# ----- the projection -----------------------------------------------------------------------------
def rotate_toward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotate the rows of `x` (n, P) by the rotation that takes unit vector `a` onto unit vector `b`
    in the plane they span; components orthogonal to that plane are unchanged. ``a == b``: identity.
    (``a == -b`` leaves the plane undefined; the identity is returned there too.)"""
    cos = torch.dot(a, b).clamp(-1.0, 1.0)
    v = b - cos * a
    sin = v.norm()
    if sin < eps:
        return x.clone()
    v = v / sin
    xa, xv = x @ a, x @ v
    rest = x - xa[:, None] * a - xv[:, None] * v
    return (cos * xa - sin * xv)[:, None] * a + (sin * xa + cos * xv)[:, None] * v + rest


def nearest_classes(old_prototypes: torch.Tensor, new_prototype: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` old classes whose text prototypes have the highest cosine with the new one."""
    return (old_prototypes @ new_prototype).topk(min(k, old_prototypes.shape[0])).indices


def project_name(raw_means: torch.Tensor, raw_stds: torch.Tensor, old_prototypes: torch.Tensor,
                 new_prototype: torch.Tensor, neighbours: int = 5, per_class: int = 20, gamma: float = 0.1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(per_class, P) unit-norm pseudo image features of a new class (steps 2-4 of the module docstring)."""
    idx = nearest_classes(old_prototypes, new_prototype, neighbours)
    rotated = []
    for k in idx.tolist():
        noise = torch.randn(per_class, raw_means.shape[1], generator=generator)
        s = F.normalize(raw_means[k] + raw_stds[k] * noise, dim=-1)
        rotated.append(rotate_toward(s, old_prototypes[k], new_prototype))
    avg = F.normalize(torch.stack(rotated).mean(0), dim=-1)
    return F.normalize((1 - gamma) * avg + gamma * new_prototype, dim=-1)


def text_space_prototypes(projected: torch.Tensor, old_means: torch.Tensor, old_text: torch.Tensor) -> torch.Tensor:
    """Class embeddings (N, P) for the raw CLIP's classifier from the mean projected features
    `projected` (N, P) of new classes: CLIP's image features sit apart from its text features (the
    modality gap), so the old classes' mean gap (normalised image mean `old_means` minus text
    prototype `old_text`) is taken off, and the new rows compete with the old text rows on equal terms.

    Example:
        >>> old_means, old_text = torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]])
        >>> text_space_prototypes(torch.tensor([[0.0, 1.0, 1.0]]), old_means, old_text)
        tensor([[0.3827, 0.9239, 0.0000]])
    """
    gap = (F.normalize(old_means, dim=-1) - old_text).mean(0)
    return F.normalize(F.normalize(projected, dim=-1) - gap, dim=-1)


def boundary_target(raw_logits: torch.Tensor, old_logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """Class probabilities (B, C) that take old-vs-new from the raw CLIP and old-vs-old from the model
    before the task: ``p[new] = raw[new]``, ``p[old] = raw[old].sum() * previous[old]``.

    The raw CLIP (``raw_logits``, all C classes) knows the new names from its pre-training; the
    previous model (``old_logits``, its ``n_old`` classes) knows the old classes better than the raw CLIP.

    Example:
        >>> raw = torch.log(torch.tensor([[0.3, 0.3, 0.4]]))  # two old classes, one new
        >>> old = torch.log(torch.tensor([[0.9, 0.1]]))
        >>> boundary_target(raw, old, n_old=2)
        tensor([[0.5400, 0.0600, 0.4000]])
    """
    c = raw_logits.shape[1]
    routed = torch.arange(c, device=raw_logits.device) >= n_old
    return routed_probs(raw_logits, F.pad(old_logits[:, :n_old], (0, c - n_old)), routed)


def routed_probs(raw_logits: torch.Tensor, logits: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, C): the `routed` classes (a (C,) bool mask) take the raw CLIP's
    probability, the others share the raw CLIP's remaining mass as `logits` split it among them.

    Example:
        >>> raw = torch.log(torch.tensor([[0.3, 0.3, 0.4]]))  # the raw CLIP
        >>> adapted = torch.log(torch.tensor([[0.8, 0.1, 0.1]]))  # the model; class 2 is routed
        >>> routed_probs(raw, adapted, torch.tensor([False, False, True]))
        tensor([[0.5333, 0.0667, 0.4000]])
    """
    raw = F.softmax(raw_logits, -1)
    kept = F.softmax(logits.masked_fill(routed, float("-inf")), -1)
    return torch.where(routed, raw, raw.masked_fill(routed, 0.0).sum(1, keepdim=True) * kept)


# ----- inside the trainer -------------------------------------------------------------------------
class _MapDataset(torch.utils.data.Dataset):
    """Inverted patch maps of the new classes with their labels (the names-only task's training set)."""

    def __init__(self, maps: torch.Tensor, labels: torch.Tensor):
        self.maps, self.labels = maps.detach().cpu(), labels.cpu()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"new_patch_maps": self.maps[i], "labels": self.labels[i]}


class _Collator:
    """Stacks inverted samples; image rows (the evaluation on real test images) go to the usual collator."""

    def __init__(self, images_collator):
        self.images_collator = images_collator

    def __call__(self, rows):
        if "new_patch_maps" not in rows[0]:
            return self.images_collator(rows)
        return {"new_patch_maps": torch.stack([r["new_patch_maps"] for r in rows]),
                "labels": torch.stack([r["labels"] for r in rows])}


def validate_names_only(trainer) -> None:
    """Errors before any work for the names-only tasks of a trainer (see the module docstring)."""
    tasks = trainer.tasks
    if not any(is_names_only(t) for t in tasks):
        return
    from .methods.pmi import PMI

    if not isinstance(trainer.method, PMI):
        raise ValueError(
            f"Names-only tasks are learned by inverting projected features: use method='pmi' (got "
            f"{trainer.args.method!r})."
        )
    known = list(trainer.model.class_names[: tasks.label_offset])
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
    if not has_adapters(trainer.model) and tasks.label_offset == 0:
        return  # a fresh run: PMI keeps a copy of the pre-trained CLIP (see `NamesOnlyLearner.snapshot`)
    with raw_clip(trainer.model):  # raises for a continued model without adapters
        pass


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
    from .statistics import collect_statistics_and_features

    with raw_clip(model, snapshot) as clip:
        stats, features = collect_statistics_and_features(clip, batches)
    bank.update_raw_statistics(stats)
    bank.add_raw_classes(class_ids, features)


class NamesOnlyLearner:
    """The names-only part of the `pmi` method: recording raw Gaussians, building and training on
    the projected samples of a names-only task."""

    def __init__(self, method):
        self.method = method
        self.snapshot = None
        trainer = method.trainer
        if any(is_names_only(t) for t in trainer.tasks) and not has_adapters(trainer.model):
            # a model trained whole loses its pre-trained weights: keep a frozen copy of them
            self.snapshot = copy.deepcopy(unwrap_clip(trainer.model.clip)).eval().requires_grad_(False)
            self.snapshot.to(trainer.args.device)
        self.data = None
        self._saved_args = None

    @property
    def raw_available(self) -> bool:
        return self.snapshot is not None or has_adapters(self.method.trainer.model)

    def after_real_task(self, task, batches) -> None:
        """Record the raw Gaussians of a task learned from images (when the raw CLIP is available)."""
        bank = self.method.bank
        if self.raw_available and bank.num_raw_classes == task.class_ids[0]:
            model = self.method.trainer.accelerator.unwrap_model(self.method.model)
            record_raw_gaussians(model, bank, task.class_ids, batches, self.snapshot)

    def before_task(self, task_id: int) -> None:
        """Project, invert, and set the trainer up for the names-only task."""
        m = self.method
        trainer, task = m.trainer, m.tasks[task_id]
        cfg = task.config
        bank = m.bank
        model = trainer.accelerator.unwrap_model(m.model)
        check_bank(bank, "this run")
        n_old = task.class_ids[0]
        new_ids, new_mask = prompts_for(model, task.class_names, trainer._tokenizer)
        with raw_clip(model, self.snapshot) as clip:
            old = raw_text_prototypes(clip, model.prompt_ids[:n_old], model.prompt_mask[:n_old]).cpu()
            new = raw_text_prototypes(clip, new_ids, new_mask).cpu()
        self.raw_text = torch.cat([old, new])  # the raw CLIP's classifier over old and new classes
        generator = torch.Generator().manual_seed(m.args.seed * 1000 + task_id)
        targets = torch.cat([
            project_name(bank.raw_means[:n_old], bank.raw_stds[:n_old], old, new[j], cfg.neighbours, cfg.per_class,
                         cfg.gamma, generator)
            for j in range(len(task.class_names))
        ])
        labels = torch.tensor(task.class_ids).repeat_interleave(cfg.per_class)
        from .inversion import invert

        inv = dataclasses.replace(m.inversion, normalize_features=True, a_layer=cfg.a_layer, refine_lr=cfg.refine_lr,
                                  alpha_tv=cfg.alpha_tv, inversion_seed=m.args.seed + 17 * task_id)
        with raw_clip(model, self.snapshot) as clip:
            result = invert(clip, targets, bank.raw_statistics, inv,
                            progress=trainer.is_world_process_zero() and not m.args.disable_tqdm)
        if cfg.route and has_adapters(model):  # from now on, evaluations score the new names by the raw CLIP
            projected = targets.view(len(task.class_ids), cfg.per_class, -1).mean(1)
            model.route_classes(task.class_ids, text_space_prototypes(projected, bank.raw_means[:n_old], old))
        self.data = _MapDataset(result.samples, labels)
        self.report = {"names_only_inversion_seconds": result.report["seconds"],
                       "names_only_feature_mse": result.report["final_feature_mse"]}
        args = trainer.args
        self._saved_args = (args.learning_rate, args.num_train_epochs, args.warmup_steps, trainer.data_collator)
        args.learning_rate, args.num_train_epochs, args.warmup_steps = cfg.learning_rate, cfg.num_train_epochs, cfg.warmup_steps
        trainer.data_collator = _Collator(trainer.data_collator)

    def compute_loss(self, model, inputs):
        """Replay losses with the inverted new-class samples in place of real images, plus the boundary
        distillation; new samples, replay and mixed samples share one forward pass (one DDP forward)."""
        from .modeling import ContinualCLIPOutput
        from .replay import replay_losses

        m = self.method
        cfg = m.tasks[m.task_id].config
        new_maps = inputs["new_patch_maps"]
        samples, labels = m.buffer
        idx = torch.randint(len(labels), (m.args.replay_batch_size,), generator=m.generator)
        replay, replay_labels = samples[idx.to(samples.device)].to(new_maps.dtype), labels[idx.to(labels.device)]
        mixed = self.mix(new_maps, replay) if cfg.boundary_kd > 0 else new_maps[:0]
        out = model(replay_patch_maps=torch.cat([new_maps, replay, mixed]))
        n, r = new_maps.shape[0], replay.shape[0]
        split = ContinualCLIPOutput(logits=out.replay_logits[:n], replay_logits=out.replay_logits[n:n + r],
                                    image_embeds=out.replay_image_embeds[:n],
                                    replay_image_embeds=out.replay_image_embeds[n:n + r],
                                    text_embeds=out.text_embeds, logit_scale=out.logit_scale)
        with torch.no_grad():  # one teacher pass for the replay and the mixed maps
            teacher_out = m.teacher(replay_patch_maps=torch.cat([replay, mixed]))
        teacher_mixed = teacher_out.replay_logits[r:].float()
        teacher_out.replay_logits = teacher_out.replay_logits[:r]
        l_ft = m.args.l_ft if cfg.l_ft is None else cfg.l_ft
        ft_detach = m.args.ft_detach if cfg.ft_detach is None else cfg.ft_detach
        terms = replay_losses(split, teacher_out, inputs["labels"], replay_labels, m.num_old, m.weights, l_ft, ft_detach)
        if cfg.boundary_kd > 0:
            t = cfg.boundary_kd_temperature
            target = self.boundary_target_of(model, mixed, teacher_mixed, t)
            student = F.log_softmax(out.replay_logits[n + r:].float() / t, -1)
            terms["boundary_kd"] = cfg.boundary_kd * F.kl_div(student, target, reduction="batchmean") * t * t
        return sum(terms.values())

    def mix(self, new_maps, replay):
        """Patch maps mixed at a random ratio between each new-class sample and a random replayed one:
        samples near the boundary of a new class and old ones."""
        g = self.method.generator
        partner = replay[torch.randint(len(replay), (new_maps.shape[0],), generator=g).to(replay.device)]
        lam = torch.rand(new_maps.shape[0], 1, 1, 1, generator=g).to(new_maps.device)
        return lam * new_maps + (1 - lam) * partner

    @torch.no_grad()
    def boundary_target_of(self, model, mixed, old_logits, temperature):
        """`boundary_target` of mixed maps: the raw CLIP (over old and new names) and the model before
        the task (its logits ``old_logits`` over the old classes), at `temperature`. Where the two
        disagree is where the adapted model has lost the raw CLIP's knowledge of the new names."""
        m = self.method
        with raw_clip(m.trainer.accelerator.unwrap_model(model), self.snapshot) as clip:
            raw = F.normalize(VisionBlocks(clip).forward_from(1, mixed).float(), dim=-1)
            raw_logits = unwrap_clip(clip).logit_scale.exp() * raw @ self.raw_text.to(raw.device).t()
        return boundary_target(raw_logits / temperature, old_logits / temperature, m.num_old)

    def after_task(self, task) -> dict:
        """Restore the trainer, and put the new classes into the bank from their inverted samples."""
        m = self.method
        trainer = m.trainer
        args = trainer.args
        args.learning_rate, args.num_train_epochs, args.warmup_steps, trainer.data_collator = self._saved_args
        model = trainer.accelerator.unwrap_model(m.model)
        maps, labels = self.data.maps, self.data.labels
        device = VisionBlocks(model).embeddings.patch_embedding.weight.device
        with torch.no_grad(), raw_clip(model, self.snapshot) as clip:
            raw = VisionBlocks(clip).forward_from(1, maps.to(device)).float().cpu()
        from .statistics import eval_mode

        with torch.no_grad(), eval_mode(model):
            feats = VisionBlocks(model).forward_from(1, maps.to(device)).float().cpu()
        per_class = {c: feats[labels == c] for c in task.class_ids}
        m.bank.add_classes(task.class_ids, per_class, train_contrastive=m.inversion.selection == "cfs", seed=m.args.seed)
        m.bank.add_raw_classes(task.class_ids, {c: raw[labels == c] for c in task.class_ids})
        m.bank.names_only_classes += list(task.class_ids)
        self.data = None
        return self.report
