"""Class-incremental learning of a BatchNorm image classifier: the R-DFCIL loop of the reference's
ResNet path, on tensors, with each class inverted once.

For each task: grow the head (`grow_classifier`) -> train on the task's images with the method's
losses (a frozen copy of the previous model is the teacher) -> fine-tune the head on real plus
replayed samples (replay methods, as R-DFCIL) -> evaluate every seen task (a row of the accuracy
matrix) -> add the new classes to the replay pool. Methods (`METHODS`):

- ``finetune``: CE over all seen classes on the task's images;
- ``lwf``: the same CE plus the KL between the teacher's and the student's old-class logits at
  temperature ``lwf_temperature`` on the same images;
- ``pmi`` / ``full_inversion``: the replay losses of `hf_pmi.resnet.losses` (local CE, hard KD on
  replayed samples, relation KD, balancing CE) with the replay pool's samples. A class's samples are
  inverted **once**, after its task, by `invert_bn` (``pmi``: the per-layer chain then the
  refinement; ``full_inversion``: a random start at the same passes) from ``replay_per_class``
  targets drawn from its Gaussian of pooled training features; they are kept for every later task
  (issue 19's design; R-DFCIL instead retrains a generator after every task);
- ``exemplar_replay``: the same losses with ``replay_per_class`` real training images per class
  (not data-free; the reference point for the inverted samples).

Joint training is ``finetune`` on one task holding every class (`benchmarks/continual_resnet.py`).
With ``output_dir`` each task is checkpointed (`hf_pmi.resnet.checkpoint`) and an interrupted run
resumes where it stopped; with ``hub_model_id`` each task is pushed to its own Hub branch; with
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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import SAFE_WEIGHTS_NAME

from ..bank import FeatureBank
from ..checkpoint import latest_task_checkpoint
from ..integrity import load_safetensors
from ..metrics import continual_metrics
from ..statistics import eval_mode
from ..validation import check_bn_rates
from .checkpoint import BANK_DIR, load_task, save_task
from .heads import (
    classifier_layer,
    feature_dim,
    grow_classifier,
    require_batchnorm,
    require_image_classifier,
)
from .inversion import BNInversionConfig, invert_bn, replay_targets
from .losses import (
    PMI_RESNET_WEIGHTS,
    RelationKD,
    class_balance_weights,
    finetune_losses,
    replay_losses,
    task_weights,
)
from .statistics import collect_block_statistics

METHODS = ("finetune", "lwf", "pmi", "full_inversion", "exemplar_replay")
INVERTING = ("pmi", "full_inversion")


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
    """Settings of `learn_tasks`. Training defaults: CIFAR ResNet practice (SGD, momentum 0.9,
    weight decay 5e-4, one-cycle to lr 0.1) at the scale of the offline fonts world."""

    method: str = field(default="pmi", metadata={"help": f"One of {METHODS}."})
    epochs: int = field(default=20, metadata={"help": "Epochs of the first task (from scratch; the fonts net sits at chance ~5 epochs)."})
    later_epochs: int = field(default=12, metadata={"help": "Epochs of every later task (the features exist by then)."})
    head_epochs: int = field(default=2, metadata={"help": "Epochs of the head fine-tuning after each later task (replay methods, R-DFCIL)."})
    batch_size: int = field(default=64, metadata={"help": "Real images per step (replay methods add as many replayed samples)."})
    lr: float = field(default=0.1, metadata={"help": "Peak SGD lr of the one-cycle schedule."})
    head_lr: float = field(default=0.01, metadata={"help": "SGD lr of the head fine-tuning (constant)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (Nesterov)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay."})
    shift: int = field(default=2, metadata={"help": "Random shift of up to this many pixels per batch (augmentation)."})
    replay_per_class: int = field(default=40, metadata={"help": "Samples kept per old class (inverted, or real for exemplar_replay)."})
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
        for name in ("epochs", "batch_size", "replay_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
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


def _features_hook(model: nn.Module):
    """Capture the classifier's input (the pooled features) at every forward."""
    store = {}
    return store, classifier_layer(model).register_forward_pre_hook(lambda _m, args: store.__setitem__("f", args[0]))


def _forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled features) of `x`."""
    store, handle = _features_hook(model)
    try:
        logits = model(pixel_values=x).logits
    finally:
        handle.remove()
    return logits, store["f"]


def _shifted(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    if pad == 0:
        return x
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    s = x.shape[-1]
    return F.pad(x, (pad,) * 4, mode="replicate")[:, :, dy:dy + s, dx:dx + s]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy over every class the head knows, in eval mode."""
    device = next(model.parameters()).device
    with eval_mode(model):
        hits = sum((model(pixel_values=xb.to(device)).logits.argmax(-1).cpu() == yb).sum().item()
                   for xb, yb in zip(x.split(500), y.split(500)))
    return hits / len(y)


class _Learner:
    def __init__(self, model: nn.Module, config: ResNetContinualConfig):
        self.model, self.config = model, config
        self.device = next(model.parameters()).device  # tasks and the pool stay on the CPU; batches move here
        self.generator = torch.Generator().manual_seed(config.seed)
        self.pool_x: torch.Tensor | None = None  # replayed samples of every old class
        self.pool_y: torch.Tensor | None = None
        self.inverted: dict[int, int] = {}  # class id -> times inverted (once, by design)
        self.inversion_seconds, self.inversion_passes = 0.0, 0.0
        self.rkd: RelationKD | None = None
        self.bank = FeatureBank(covariance="diag")  # class Gaussians of pooled features: the inversion targets

    def _batches(self, n: int):
        return torch.randperm(n, generator=self.generator).split(self.config.batch_size)

    def _replay_batch(self, size: int):
        idx = torch.randint(0, len(self.pool_y), (size,), generator=self.generator)
        return self.pool_x[idx].to(self.device), self.pool_y[idx].to(self.device)

    def train_task(self, task: TensorTask, teacher: nn.Module | None, n_old: int) -> dict[str, float]:
        cfg, model = self.config, self.model
        replay = teacher is not None and self.pool_y is not None and cfg.method not in ("finetune", "lwf")
        params = list(model.parameters())
        if replay:
            if self.rkd is None:
                self.rkd = RelationKD(feature_dim(model)).to(self.device)
            params += list(self.rkd.parameters())
            w = task_weights(n_old, len(task.class_ids), **cfg.weights)
        epochs = cfg.epochs if teacher is None else cfg.later_epochs
        steps = math.ceil(len(task.y) / cfg.batch_size)
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, epochs=epochs, steps_per_epoch=steps)
        head = classifier_layer(model)
        model.train()
        first = last = None
        for _ in range(epochs):
            for idx in self._batches(len(task.y)):
                x, y = task.x[idx].to(self.device), task.y[idx].to(self.device)
                if replay:
                    xr, yr = self._replay_batch(len(idx))
                    both = _shifted(torch.cat([x, xr]), cfg.shift, self.generator)
                    logits, feats = _forward(model, both)
                    with torch.no_grad():
                        t_logits, t_feats = _forward(teacher, both)
                    b = len(idx)
                    terms = replay_losses(logits[:b], y, feats[:b], t_feats[:b], logits[b:], yr, feats[b:],
                                          t_logits[b:], head, self.rkd, n_old, w)
                    loss = sum(terms.values())
                else:
                    x = _shifted(x, cfg.shift, self.generator)
                    logits, _ = _forward(model, x)
                    loss = F.cross_entropy(logits, y)
                    if teacher is not None and cfg.method == "lwf":
                        with torch.no_grad():
                            t_logits = teacher(pixel_values=x).logits
                        T = cfg.lwf_temperature
                        kd = F.kl_div(F.log_softmax(logits[:, :n_old] / T, -1), F.softmax(t_logits / T, -1),
                                      reduction="batchmean") * T * T
                        loss = loss + cfg.l_lwf * kd
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                first = loss.item() if first is None else first
                last = loss.item()
        if replay and cfg.head_epochs:
            self._finetune_head(task, teacher, n_old, w["hkd"])
        return {"first_loss": first, "last_loss": last}

    def _finetune_head(self, task: TensorTask, teacher: nn.Module, n_old: int, w_hkd: float) -> None:
        """R-DFCIL's head fine-tuning: class-balanced CE on real plus replayed samples and the hard KD;
        the body frozen and in eval mode (its BN statistics stay those of the main epochs)."""
        cfg, model = self.config, self.model
        head = classifier_layer(model)
        counts = torch.bincount(torch.cat([task.y, self.pool_y]), minlength=head.out_features).float()
        weights = class_balance_weights(counts).to(self.device)
        opt = torch.optim.SGD(head.parameters(), lr=cfg.head_lr, momentum=cfg.momentum)
        with eval_mode(model):
            for _ in range(cfg.head_epochs):
                for idx in self._batches(len(task.y)):
                    xr, yr = self._replay_batch(len(idx))
                    with torch.no_grad():
                        _, feats = _forward(model, torch.cat([task.x[idx].to(self.device), xr]))
                        t_logits = teacher(pixel_values=xr).logits
                    logits = head(feats)
                    b = len(idx)
                    terms = finetune_losses(logits[:b], task.y[idx].to(self.device), logits[b:], yr, t_logits, n_old, weights,
                                            l_ce=cfg.weights["l_ce"], w_hkd=w_hkd)
                    opt.zero_grad()
                    sum(terms.values()).backward()
                    opt.step()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs besides the model: the pool, the RKD projections, the random state."""
        tensors = {"generator_state": self.generator.get_state(), "torch_rng_state": torch.get_rng_state()}
        if self.pool_y is not None:
            tensors.update(pool_x=self.pool_x, pool_y=self.pool_y)
        if self.rkd is not None:
            tensors.update({f"rkd.{k}": v for k, v in self.rkd.state_dict().items()})
        return tensors

    def state_json(self) -> dict:
        return {"inverted_classes": self.inverted, "inversion_seconds": self.inversion_seconds,
                "inversion_passes": self.inversion_passes}

    def load_state(self, state: dict, tensors: dict[str, torch.Tensor], folder: str, resume: bool = True) -> None:
        """The pool, relation-KD projections and bank of a finished task; `resume` also its counters and random
        state (a resumed run goes on as if never stopped; a continued one draws from its own seed)."""
        rkd = {k[len("rkd."):]: v for k, v in tensors.items() if k.startswith("rkd.")}
        if rkd:
            self.rkd = RelationKD(feature_dim(self.model)).to(self.device)
            self.rkd.load_state_dict(rkd)
        if "pool_y" in tensors:
            self.pool_x, self.pool_y = tensors["pool_x"], tensors["pool_y"]
        bank = os.path.join(folder, BANK_DIR)
        if os.path.isdir(bank):
            self.bank = FeatureBank.from_pretrained(bank)
        if not resume:
            return
        self.inverted = {int(c): n for c, n in state["inverted_classes"].items()}
        self.inversion_seconds, self.inversion_passes = state["inversion_seconds"], state["inversion_passes"]
        self.generator.set_state(tensors["generator_state"])
        torch.set_rng_state(tensors["torch_rng_state"])  # last: building the RKD above drew from it

    def add_to_pool(self, task: TensorTask) -> None:
        """The replayed samples of the task's classes: inverted once (pmi / full_inversion) or real."""
        cfg = self.config
        if cfg.method in INVERTING:
            _, feats = collect_block_statistics(self.model, zip(task.x.split(500), task.y.split(500)),
                                                image_size=task.x.shape[-1])
            self.bank.add_classes(task.class_ids, feats, train_contrastive=False)
            targets, labels = replay_targets(self.bank, task.class_ids, cfg.replay_per_class, self.generator,
                                             selection="gaussian")
            inv = dataclasses.replace(cfg.inversion, mode="pmi" if cfg.method == "pmi" else "full",
                                      inversion_seed=cfg.seed * 1000 + task.class_ids[0])
            result = invert_bn(self.model, targets, inv, image_size=task.x.shape[-1])  # the data's size, whatever the config says
            x = result.samples.detach().cpu()
            self.inversion_seconds += result.report["seconds"]
            self.inversion_passes += result.report["full_model_passes"]
            for c in task.class_ids:
                self.inverted[c] = self.inverted.get(c, 0) + 1
        elif cfg.method == "exemplar_replay":
            keep = [torch.nonzero(task.y == c).flatten() for c in task.class_ids]
            keep = torch.cat([k[torch.randperm(len(k), generator=self.generator)[: cfg.replay_per_class]] for k in keep])
            x, labels = task.x[keep], task.y[keep]
        else:
            return
        self.pool_x = x if self.pool_x is None else torch.cat([self.pool_x, x])
        self.pool_y = labels if self.pool_y is None else torch.cat([self.pool_y, labels])


def learn_tasks(model: nn.Module, tasks: list[TensorTask], config: ResNetContinualConfig | None = None, *,
                output_dir: str | None = None, hub_model_id: str | None = None, hub_token: str | None = None,
                hub_endpoint: str | None = None, start_from: str | None = None, processor=None,
                events: Callable[[str, int, dict], None] | None = None) -> dict:
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
    if hub_model_id:
        from ..hub import check_hub_access

        check_hub_access(hub_model_id, token=hub_token, endpoint=hub_endpoint)
    lock = None
    if output_dir:
        from ..lock import RunLock

        os.makedirs(output_dir, exist_ok=True)
        lock = RunLock(output_dir).acquire()
    try:
        return _learn(model, tasks, config, output_dir, (hub_model_id, hub_token, hub_endpoint), start_from, start,
                      processor, events or (lambda *_: None))
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


def _learn(model, tasks, config, output_dir, hub, start_from, start, processor, events) -> dict:
    hub_model_id, hub_token, hub_endpoint = hub
    torch.manual_seed(config.seed)  # new head rows and RKD projections
    learner = _Learner(model, config)
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
            learner.add_to_pool(task)
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
            folder = save_task(output_dir, model, learner.state_tensors(), state, learner.bank, hub_model_id, processor)
            if hub_model_id:
                from ..hub import push_task_checkpoint

                result = push_task_checkpoint(folder, hub_model_id, g, token=hub_token, endpoint=hub_endpoint)
                pushes.append({"task": g, "ok": bool(result), "commit": getattr(result, "commit_sha", None),
                               "folder": folder, "error": result.error, "retry_command": result.retry_command})
        events("on_task_end", g, {"accuracy_matrix": matrix, "counts": counts, "folder": folder, "losses": losses,
                                  "task_seconds": task_seconds})
    return {
        "accuracy_matrix": matrix, **continual_metrics(matrix, counts), "counts": counts, "task_offset": offset,
        "inversion_seconds": learner.inversion_seconds, "inversion_passes": learner.inversion_passes,
        "inverted_classes": learner.inverted, "task_seconds": task_seconds, "losses": losses, "pushes": pushes,
    }
