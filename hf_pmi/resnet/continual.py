"""Class-incremental learning of a BatchNorm image classifier: the loop of the reference's ResNet path
(R-DFCIL's, with PMI's inversion and contrastive feature selection), on tensors.

For each task: grow the head (`grow_classifier`) -> train on the task's images with the method's losses
(a frozen copy of the previous model is the teacher), in the reference's stages for later tasks
(`hf_pmi.resnet.training`: the new rows alone, then the last block, then everything at a low lr; the
old classifier rows frozen) -> fine-tune the head on real plus replayed samples (replay methods, as
R-DFCIL) -> evaluate every seen task (a row of the accuracy matrix) -> renew the replay pool
(`hf_pmi.resnet.learner`). Each training phase (and the head fine-tuning) is one ``transformers.Trainer.train()``
(`hf_pmi.resnet.loop`): trackers, progress bars, gradient accumulation, clipping, mixed precision and several
processes come from Trainer (``args``). Methods (`METHODS`):

- ``finetune``: CE over all seen classes on the task's images;
- ``lwf``: the same CE plus the KL between the teacher's and the student's old-class logits at
  temperature ``lwf_temperature`` on the same images;
- ``pmi`` / ``full_inversion``: the replay losses of `hf_pmi.resnet.losses` (local CE, hard KD on
  replayed samples, relation KD, balancing CE) with the pool's samples, inverted by `invert_bn`
  (``pmi``: the per-layer chain then the refinement; ``full_inversion``: a random start at the same
  passes) from targets drawn by CFS from the class Gaussians of pooled features. With ``regenerate``
  (reference) every seen class is inverted anew after each task from Gaussians re-fitted on the pool
  seen through the new model; without it each class is inverted once, after its task (issue 19);
- ``exemplar_replay``: the same losses with real training images per class (not data-free; the
  reference point for the inverted samples).

Joint training is ``finetune`` on one task holding every class (`benchmarks/continual_resnet.py`).
With ``output_dir`` each task is checkpointed (`hf_pmi.resnet.checkpoint`) and an interrupted run
resumes where it stopped; with ``hub_model_id`` each task is pushed to its own Hub branch (in the background,
one push at a time); with
``start_from`` a finished task's run goes on with new classes, data-free. `ContinualTrainer` runs this
loop when it is given such a model (`hf_pmi.resnet.runner`: datasets in, callbacks, `ContinualResult`).

Example:
    >>> import torch
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> from hf_pmi.resnet.continual import ResNetContinualConfig, TensorTask, learn_tasks
    >>> g = torch.Generator().manual_seed(0)
    >>> def task(c0):  # two classes, each a constant image of its own colour
    ...     y = torch.tensor([c0, c0 + 1] * 8)
    ...     x = (y.view(-1, 1, 1, 1).float() - 1.5) + 0.1 * torch.randn(16, 3, 8, 8, generator=g)
    ...     return TensorTask([c0, c0 + 1], x, y, x, y)
    >>> model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=0,
    ...                                                       image_size=8))
    >>> config = ResNetContinualConfig(method="finetune", epochs=2, later_epochs=2, batch_size=8, progress=False)
    >>> result = learn_tasks(model, [task(0), task(2)], config)
    >>> len(result["accuracy_matrix"]), model.config.num_labels
    (2, 4)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from torch import nn
from transformers.utils import SAFE_WEIGHTS_NAME

from ..checkpoint import latest_task_checkpoint
from ..integrity import load_safetensors
from ..metrics import continual_metrics
from ..statistics import eval_mode
from ..validation import check_bn_rates
from .checkpoint import load_task, save_task
from .heads import classifier_layer, grow_classifier, require_batchnorm, require_image_classifier
from .inversion import BNInversionConfig
from .learner import INVERTING, Learner
from .loop import phase_trainer
from .losses import PMI_RESNET_WEIGHTS

METHODS = ("finetune", "lwf", "pmi", "full_inversion", "exemplar_replay")
# The remaining deviations from the reference (docs/resnet.md): hf_pmi's default first, the other reading second.
CHOICES = {"last_stage": ("block", "stage"), "loss_form": ("sum", "product"), "target_classes": ("equal", "random"),
           "head_counts": ("fixed", "running")}

# Settings added after folders were written (issue 30's deviation flags): such a folder ran with their defaults.
ADDED_SETTINGS = ("crop_fill", *CHOICES)


def black_fill(mean, std) -> tuple[float, ...]:
    """The normalised value of a black pixel, per channel: what torchvision's crop pads with before normalising
    (`ResNetContinualConfig.crop_fill`).

    Example:
        >>> black_fill([0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
        (-2.0, -1.0, -0.5)
    """
    return tuple(-m / s for m, s in zip(mean, std))


@dataclass
class TensorTask:
    """One task: its class ids (contiguous, after the earlier tasks'), training and test tensors
    (``x``: normalised pixels ``(N, C, H, W)``, ``y``: global class ids)."""

    class_ids: list[int]
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str] | None = None  # the head's id2label for these classes (default "LABEL_i")


@dataclass
class ResNetContinualConfig:
    """Settings of `learn_tasks`. The schedule, replay and selection defaults are the reference's ResNet path
    (`hf_pmi.resnet.training`, `hf_pmi.resnet.learner`); epochs, batch size, replay size and head lr are at the
    scale of the offline fonts world (the recipes set the reference's: `hf_pmi.resnet.recipe`)."""

    method: str = field(default="pmi", metadata={"help": f"One of {METHODS}."})
    epochs: int = field(default=20, metadata={"help": "Epochs of the first task (from scratch; the fonts net sits at chance ~5 epochs)."})
    later_epochs: int = field(default=12, metadata={"help": "Epochs of every later task, split 20 : 20 : 120 over the "
                              "reference's stages (new rows; + last block; everything) unless stage_epochs says otherwise."})
    schedule: str = field(default="staged", metadata={"help": "'staged' (reference: first task multi-step lr, later tasks "
                          "in stages with the old classifier rows frozen) or 'one_cycle' (hf_pmi before issue 30: one "
                          "one-cycle run to lr over every parameter, old rows included)."})
    stage_epochs: tuple[int, ...] | None = field(default=None, metadata={"help": "Epochs of the three later-task stages "
                                                 "(None: later_epochs split 20 : 20 : 120, the reference's '20,20,0,0,120')."})
    stage_lrs: tuple[float, ...] = field(default=(0.1, 0.05, 5e-3), metadata={"help": "SGD lr of the three stages "
                                         "(reference '1e-1,5e-2,0,0,5e-3'; CIFAR-100 10 / 20 tasks end at 1e-2)."})
    head_epochs: int = field(default=2, metadata={"help": "Epochs of the head fine-tuning after each later task (replay methods, R-DFCIL)."})
    batch_size: int = field(default=64, metadata={"help": "Real images per step (replay methods add as many replayed samples)."})
    lr: float = field(default=0.1, metadata={"help": "SGD lr of the first task (x0.1 at 40 % and 60 % of its epochs; "
                      "reference base_lr 0.1, milestones 80 / 120 of 200), and the one-cycle peak with schedule='one_cycle'."})
    head_lr: float = field(default=0.01, metadata={"help": "SGD lr of the head fine-tuning (constant; reference 0.005)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay."})
    shift: int = field(default=2, metadata={"help": "Per-image random crop after zero padding of this many pixels "
                       "(reference CIFAR: 4); replayed samples are not augmented."})
    flip: bool = field(default=False, metadata={"help": "Per-image random horizontal flip (reference CIFAR / Tiny: on; "
                       "off for letters, whose mirror images are other letters)."})
    crop_fill: tuple[float, ...] | None = field(default=None, metadata={"help": "Per-channel value of the crop's "
                                               "padding in normalised units; None: 0, the channel mean. The reference "
                                               "pads black before normalising: `black_fill(mean, std)` (the recipes)."})
    last_stage: str = field(default=CHOICES["last_stage"][0], metadata={"help": "What the second later-task stage adds to the new rows: "
                            "'block' (the last residual block, the reference's PODNet-style stage_4) or 'stage' (the whole "
                            "last stage)."})
    loss_form: str = field(default=CHOICES["loss_form"][0], metadata={"help": "'sum' of the replay terms (R-DFCIL, method.md) or "
                           "'product' (the reference's code: ce + hkd + rkd x ft; in the new-rows stage ce + hkd x ft)."})
    target_classes: str = field(default=CHOICES["target_classes"][0], metadata={"help": "Classes of the pool's inversion targets: 'equal' "
                                "shares, or 'random' (the reference: each target's class drawn uniformly)."})
    head_counts: str = field(default=CHOICES["head_counts"][0], metadata={"help": "Class counts that weigh the head fine-tuning's CE: "
                             "'fixed' at the end of the main stages, or 'running' (still counted during it, the weights "
                             "renewed every batch)."})
    replay_per_class: int = field(default=40, metadata={"help": "Samples per old class (inverted, or real for "
                                  "exemplar_replay), unless init_samples is set."})
    init_samples: int | None = field(default=None, metadata={"help": "The reference's buffer: init_samples + t x "
                                     "per_task_samples samples over the old classes at task t (CIFAR-100 5 tasks: 6000 + t x 5000)."})
    per_task_samples: int | None = field(default=None, metadata={"help": "Growth of the reference's buffer per task."})
    regenerate: bool = field(default=True, metadata={"help": "Reference: after each task re-fit the old classes' "
                             "Gaussians (and contrastive models) on the pool seen through the new model and invert every "
                             "seen class anew. False: each class inverted once, after its task, and kept (issue 19)."})
    selection: str = field(default="cfs", metadata={"help": "Inversion targets: 'cfs' (reference: contrastive feature "
                           "selection) or 'gaussian' (plain draws from the class Gaussians)."})
    cfs_step: int = field(default=40, metadata={"help": "CFS batch = max(samples of the class // cfs_step, 2) (reference cont_step 40)."})
    cfs_rho: float = field(default=0.5, metadata={"help": "CFS acceptance rate (reference cont_rslt 0.5)."})
    lwf_temperature: float = field(default=2.0, metadata={"help": "Temperature of LwF's distillation."})
    l_lwf: float = field(default=1.0, metadata={"help": "Weight of LwF's distillation."})
    weights: dict = field(default_factory=lambda: dict(PMI_RESNET_WEIGHTS),
                          metadata={"help": "l_ce, l_hkd, l_rkd, l_ft of the replay losses (reference: PMI's ResNet scripts)."})
    inversion: BNInversionConfig = field(default_factory=BNInversionConfig,
                                         metadata={"help": "Settings of `invert_bn` (mode is set from `method`)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, batches, targets and inversion."})
    progress: bool = field(default=True, metadata={"help": "Print one line per task."})

    @classmethod
    def from_dict(cls, values: dict) -> "ResNetContinualConfig":
        """The config recorded in a task folder's state (``settings.config``), nested inversion settings included."""
        values = dict(values)
        values["inversion"] = BNInversionConfig(**values.get("inversion", {}))
        return cls(**values)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: choose one of {METHODS}.")
        for name in ("epochs", "batch_size", "replay_per_class", "cfs_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.schedule not in ("staged", "one_cycle"):
            raise ValueError(f"schedule must be 'staged' (reference) or 'one_cycle', got {self.schedule!r}.")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices} (the first is hf_pmi's default), got "
                                 f"{getattr(self, name)!r}.")
        if self.crop_fill is not None:
            self.crop_fill = tuple(float(v) for v in self.crop_fill)
        if self.selection not in ("cfs", "gaussian"):
            raise ValueError(f"selection must be 'cfs' (reference) or 'gaussian', got {self.selection!r}.")
        self.stage_lrs = tuple(float(v) for v in self.stage_lrs)
        if self.stage_epochs is not None:
            self.stage_epochs = tuple(int(v) for v in self.stage_epochs)
        for name, value in (("stage_lrs", self.stage_lrs), ("stage_epochs", self.stage_epochs)):
            if value is not None and len(value) != 3:
                raise ValueError(f"{name} takes three values (new rows; + last block; everything), got {list(value)}.")
        if (self.init_samples is None) != (self.per_task_samples is None):
            raise ValueError("init_samples and per_task_samples go together (the reference's buffer: init_samples + t x "
                             "per_task_samples); set both, or neither to use replay_per_class.")
        if not 0 < self.cfs_rho <= 1:
            raise ValueError(f"cfs_rho is an acceptance rate in (0, 1], got {self.cfs_rho}.")
        if self.inversion.input_prior == "recorded" and self.method not in INVERTING:
            raise ValueError("inversion.input_prior='recorded' only serves 'pmi' / 'full_inversion'.")
        missing = {"l_ce", "l_hkd", "l_rkd", "l_ft"} - set(self.weights)
        if missing:
            raise ValueError(f"weights lacks {sorted(missing)}; give all of l_ce, l_hkd, l_rkd, l_ft.")
        check_bn_rates(self)


def own_classes(model: nn.Module) -> int:
    """Classes the model's head already has (0 before the first task); a head that cannot grow is a TypeError."""
    head = classifier_layer(model)
    return head.out_features if isinstance(head, nn.Linear) else 0


def _check_tasks(tasks: list[TensorTask], model: nn.Module) -> None:
    seen = own_classes(model)  # the model's own classes come first
    for t, task in enumerate(tasks):
        if task.class_ids != list(range(seen, seen + len(task.class_ids))) or not task.class_ids:
            raise ValueError(f"Task {t} has classes {task.class_ids}; they must be {seen}, {seen + 1}, ... (contiguous, "
                             "after the earlier tasks' and the model's own classes).")
        if task.class_names is not None and len(task.class_names) != len(task.class_ids):
            raise ValueError(f"Task {t} has {len(task.class_names)} class names for {len(task.class_ids)} classes.")
        for name, labels in (("training", task.y), ("test", task.y_test)):
            bad = sorted(set(labels.unique().tolist()) - set(task.class_ids))
            if bad:
                raise ValueError(f"Task {t}'s {name} labels hold classes {bad} outside its classes {task.class_ids}.")
        seen += len(task.class_ids)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy over every class the head knows, in eval mode."""
    device = next(model.parameters()).device
    with eval_mode(model):
        hits = sum((model(pixel_values=xb.to(device)).logits.argmax(-1).cpu() == yb).sum().item()
                   for xb, yb in zip(x.split(500), y.split(500)))
    return hits / len(y)


def learn_tasks(model: nn.Module, tasks: list[TensorTask], config: ResNetContinualConfig | None = None, *,
                output_dir: str | None = None, hub_model_id: str | None = None, hub_token: str | None = None,
                hub_endpoint: str | None = None, start_from: str | None = None, processor=None,
                events: Callable[[str, int, dict], None] | None = None, args=None, callback_handler=None) -> dict:
    """Learn `tasks` in turn with ``config.method`` (see the module docstring); `model` is trained in place,
    on whatever device it sits (the tasks' tensors stay on the CPU; batches move to the model).

    With `output_dir`, every finished task is saved to ``output_dir/task-{t}`` (`hf_pmi.resnet.checkpoint`:
    the model, the replay pool, the bank, the state, a card and `processor` if given), and a run that finds
    finished tasks there continues after the last one (same settings and tasks, or a `ValueError` that names
    the difference), with the same result as a run that was never interrupted. One run at a time writes to
    `output_dir` (`hf_pmi.lock.RunLock`). With `hub_model_id`, each finished task is pushed to branch
    ``task-{t}`` of that repo (created first; access is checked before any work) and ``main`` follows the latest.
    With `output_dir` the last task's classes are inverted too, so that a checkpoint holds samples of every
    class it knows.

    `start_from` continues a finished run data-free: a task folder of it, whose model `model` is (loaded
    with ``from_pretrained``); its replay pool, relation-KD projections and bank are loaded, its classes
    are the old ones (the teacher distils them from the first new task on) and the new tasks are numbered
    after its tasks (folders, branches and accuracy-matrix columns; earlier columns stay None).
    `events(name, task, info)` is called with ``"on_task_begin"`` and ``"on_task_end"`` (info: the matrix,
    test counts, the task folder, the losses and seconds of every task so far).

    Every training phase is one ``transformers.Trainer.train()`` (`hf_pmi.resnet.loop`). `args`, a
    `TrainingArguments`, sets what the Trainer adds: ``report_to``, ``logging_steps``, progress bars,
    ``gradient_accumulation_steps``, ``max_grad_norm``, mixed precision, the device; the schedule and batch
    size stay `config`'s. Without it: the reference's choices (no clipping, one step per batch), silent.
    `callback_handler`: the callbacks to use instead of the Trainer's own (`ContinualTrainer` passes its own).

    Returns ``accuracy_matrix`` (row t: accuracy on each seen task after task t), the metrics of
    `hf_pmi.metrics.continual_metrics` (``a_last``, ``a_avg``, ...), ``inversion_seconds`` and
    ``inversion_passes`` (sums over the run), ``inverted_classes`` (class id -> times inverted),
    ``task_seconds``, the first/last training loss per task and ``pushes`` (the Hub commits). Every input is
    checked before any work.
    """
    config = config or ResNetContinualConfig()
    require_image_classifier(model)
    if config.method in INVERTING:
        require_batchnorm(model, config.method)
    _check_tasks(tasks, model)
    start = _start_state(model, config, start_from) if start_from else None
    if hub_model_id and not output_dir:
        raise ValueError("hub_model_id needs output_dir: each task is saved there, then pushed.")
    if hub_model_id and PartialState().is_main_process:  # the main process writes and pushes
        from ..hub import check_hub_access

        check_hub_access(hub_model_id, token=hub_token, endpoint=hub_endpoint)
    lock = None
    if output_dir and PartialState().is_main_process:  # one writer per output_dir; other processes only read it
        from ..lock import RunLock

        os.makedirs(output_dir, exist_ok=True)
        lock = RunLock(output_dir).acquire()
    try:
        return _learn(model, tasks, config, output_dir, (hub_model_id, hub_token, hub_endpoint), start_from, start,
                      processor, events or (lambda *_: None), (args, callback_handler))
    finally:
        if lock is not None:
            lock.release()


def _start_state(model: nn.Module, config: ResNetContinualConfig, folder: str) -> tuple[dict, dict]:
    """The state and tensors of the finished task `folder` a run continues, checked against `model` and `config`."""
    state, tensors = load_task(folder)
    if state["num_labels"] != own_classes(model):
        raise ValueError(f"The model has {own_classes(model)} classes but {folder} was saved with {state['num_labels']}: "
                         f"load the model from that folder (`from_pretrained({folder!r})`) before continuing from it.")
    replays = ("exemplar_replay", *INVERTING)
    real = {state["method"] == "exemplar_replay", config.method == "exemplar_replay"}
    if config.method in replays and state["method"] in replays and len(real) > 1:
        raise ValueError(f"{folder} was learnt with {state['method']!r}; its replay pool holds "
                         f"{'real images' if state['method'] == 'exemplar_replay' else 'inverted samples'}, which "
                         f"{config.method!r} cannot replay as its own. Continue with {state['method']!r}, or with "
                         "'finetune' / 'lwf' (no replay).")
    return state, tensors


def _settings(config: ResNetContinualConfig, tasks: list[TensorTask], offset: int) -> dict:
    """What a resumed run must share with the run it continues (JSON-normalised)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    return json.loads(json.dumps({"config": settings, "task_classes": [t.class_ids for t in tasks],
                                  "train_sizes": [len(t.y) for t in tasks], "task_offset": offset}))


def _learn(model, tasks, config, output_dir, hub, start_from, start, processor, events, trainer) -> dict:
    hub_model_id, hub_token, hub_endpoint = hub
    generator = torch.Generator().manual_seed(config.seed)  # batches, crops, replay draws, new head rows
    loop = phase_trainer(model, generator, config, *trainer, output_dir=output_dir)  # seeds: before ours
    torch.manual_seed(config.seed)  # RKD projections
    learner = Learner(model, config, loop, generator)
    own = own_classes(model)  # classes of the model (or the run it continues) before these tasks
    offset = start[0]["task_id"] + 1 if start else 0  # tasks of the run it continues
    earlier = [list(c) for c in start[0]["task_classes"][:offset]] if start else []
    matrix: list[list[float | None]] = []
    losses, task_seconds, pushes = [], [], []
    settings = _settings(config, tasks, offset)
    first = 0
    latest = latest_task_checkpoint(output_dir) if output_dir else None
    if latest is not None and int(os.path.basename(latest).split("-")[1]) < offset:
        latest = None  # the continued run's own folders, in the same output_dir: nothing of this run yet
    if latest is not None:
        state, tensors = load_task(latest)
        added = {f.name: f.default for f in dataclasses.fields(ResNetContinualConfig) if f.name in ADDED_SETTINGS}
        state["settings"]["config"] = {**added, **state["settings"]["config"]}  # folders written before them
        differ = sorted(k for k in set(settings["config"]) | set(state["settings"]["config"])
                        if settings["config"].get(k) != state["settings"]["config"].get(k))
        if differ or state["settings"] != settings:
            what = f"settings {differ}" if differ else "tasks (classes, training set sizes or the run continued)"
            raise ValueError(f"{output_dir} holds a run with other {what} than this one ({latest}). Continue it with "
                             "the same settings and data, or write this run to another output_dir (or delete the folder "
                             "to start over).")
        grow_classifier(model, state["num_labels"] - own_classes(model))
        model.load_state_dict(load_safetensors(os.path.join(latest, SAFE_WEIGHTS_NAME)))
        learner.load_state(state, tensors, latest)
        matrix, losses, task_seconds = state["accuracy_matrix"], state["losses"], state["task_seconds"]
        first = state["task_id"] + 1 - offset
        if config.progress:
            print(f"[hf_pmi] resuming after task {state['task_id']} from {latest}", flush=True)
    elif start:
        learner.load_state(*start, start_from, resume=False)
    counts = [0] * offset + [len(k.y_test) for k in tasks]
    for t in range(first, len(tasks)):
        task, g = tasks[t], offset + t
        events("on_task_begin", g, {})
        t0 = time.perf_counter()
        n_old = own + sum(len(k.class_ids) for k in tasks[:t])
        teacher = copy.deepcopy(model).eval().requires_grad_(False) if n_old else None
        grow_classifier(model, len(task.class_ids), names=task.class_names, generator=learner.generator)
        losses.append(learner.train_task(task, teacher, n_old))
        row = [accuracy(model, k.x_test, k.y_test) for k in tasks[: t + 1]]
        matrix.append([None] * offset + row + [None] * (len(tasks) - t - 1))
        if t < len(tasks) - 1 or output_dir:  # a saved last task keeps samples of its classes too (to continue from)
            learner.add_to_pool(task, g + 1)
        task_seconds.append(time.perf_counter() - t0)
        if config.progress:
            print(f"[hf_pmi] {config.method} task {g}: accuracy on seen tasks {[round(a, 3) for a in row]}, "
                  f"{task_seconds[-1]:.0f} s (inversion {learner.inversion_seconds:.0f} s so far)", flush=True)
        folder = None
        if output_dir:
            metrics = continual_metrics(matrix[: t + 1], counts)
            state = {"task_id": g, "num_tasks": offset + len(tasks), "method": config.method, "seed": config.seed,
                     "num_labels": model.config.num_labels, "task_classes": earlier + [k.class_ids for k in tasks],
                     "settings": settings, "accuracy_matrix": matrix, "a_last": metrics["a_last"],
                     "a_avg": metrics["a_avg"], "losses": losses, "task_seconds": task_seconds, **learner.state_json()}
            folder = os.path.join(output_dir, f"task-{g}")
            if loop.is_world_process_zero():  # one writer; every process goes on with the same model and pool
                save_task(output_dir, model, learner.state_tensors(), state, learner.bank, hub_model_id, processor)
                if hub_model_id:  # in the background, one push at a time in task order (hf_pmi.hub)
                    from ..hub import push_task_checkpoint

                    pushes.append((g, push_task_checkpoint(folder, hub_model_id, g, token=hub_token,
                                                           endpoint=hub_endpoint, run_as_future=True)))
            loop.accelerator.wait_for_everyone()
        events("on_task_end", g, {"accuracy_matrix": matrix, "counts": counts, "folder": folder, "losses": losses,
                                  "task_seconds": task_seconds})
    pushes = [_push_record(g, future.result()) for g, future in pushes]
    return {
        "accuracy_matrix": matrix, **continual_metrics(matrix, counts), "counts": counts, "task_offset": offset,
        "inversion_seconds": learner.inversion_seconds, "inversion_passes": learner.inversion_passes,
        "inverted_classes": learner.inverted, "task_seconds": task_seconds, "losses": losses, "pushes": pushes,
    }


def _push_record(g: int, result) -> dict:
    return {"task": g, "ok": bool(result), "commit": getattr(result, "commit_sha", None), "folder": result.folder,
            "error": result.error, "retry_command": result.retry_command}
