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
Not wired into `ContinualTrainer` yet (no checkpoints, Hub branches or resume here): this is the
method for the BN family that the trainer integration will call.

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
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..bank import FeatureBank
from ..metrics import continual_metrics
from ..statistics import eval_mode
from .heads import (
    classifier_linear,
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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: choose one of {METHODS}.")
        for name in ("epochs", "batch_size", "replay_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        missing = {"l_ce", "l_hkd", "l_rkd", "l_ft"} - set(self.weights)
        if missing:
            raise ValueError(f"weights lacks {sorted(missing)}; give all of l_ce, l_hkd, l_rkd, l_ft.")


def _check_tasks(tasks: list[TensorTask], model: nn.Module) -> None:
    classifier_linear(model)  # a head that can grow, or a TypeError naming the fix
    seen = model.config.num_labels if isinstance(getattr(model, "classifier", None), nn.Linear) else 0
    for t, task in enumerate(tasks):
        if task.class_ids != list(range(seen, seen + len(task.class_ids))) or not task.class_ids:
            raise ValueError(f"Task {t} has classes {task.class_ids}; they must be {seen}, {seen + 1}, ... (contiguous, "
                             "after the earlier tasks' and the model's own classes).")
        for name, labels in (("training", task.y), ("test", task.y_test)):
            bad = sorted(set(labels.unique().tolist()) - set(task.class_ids))
            if bad:
                raise ValueError(f"Task {t}'s {name} labels hold classes {bad} outside its classes {task.class_ids}.")
        seen += len(task.class_ids)


def _features_hook(model: nn.Module):
    """Capture the classifier's input (the pooled features) at every forward."""
    parent, key = classifier_linear(model)
    layer = parent[key] if isinstance(key, int) else getattr(parent, key)
    store = {}
    return store, layer.register_forward_pre_hook(lambda _m, args: store.__setitem__("f", args[0]))


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
    with eval_mode(model):
        hits = sum((model(pixel_values=xb).logits.argmax(-1) == yb).sum().item()
                   for xb, yb in zip(x.split(500), y.split(500)))
    return hits / len(y)


class _Learner:
    def __init__(self, model: nn.Module, config: ResNetContinualConfig):
        self.model, self.config = model, config
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
        return self.pool_x[idx], self.pool_y[idx]

    def train_task(self, task: TensorTask, teacher: nn.Module | None, n_old: int) -> dict[str, float]:
        cfg, model = self.config, self.model
        replay = teacher is not None and self.pool_y is not None and cfg.method not in ("finetune", "lwf")
        params = list(model.parameters())
        if replay:
            if self.rkd is None:
                self.rkd = RelationKD(feature_dim(model))
            params += list(self.rkd.parameters())
            w = task_weights(n_old, len(task.class_ids), **cfg.weights)
        epochs = cfg.epochs if teacher is None else cfg.later_epochs
        steps = math.ceil(len(task.y) / cfg.batch_size)
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, epochs=epochs, steps_per_epoch=steps)
        model.train()
        first = last = None
        for _ in range(epochs):
            for idx in self._batches(len(task.y)):
                x, y = task.x[idx], task.y[idx]
                if replay:
                    xr, yr = self._replay_batch(len(idx))
                    both = _shifted(torch.cat([x, xr]), cfg.shift, self.generator)
                    logits, feats = _forward(model, both)
                    with torch.no_grad():
                        t_logits, t_feats = _forward(teacher, both)
                    b = len(idx)
                    terms = replay_losses(logits[:b], y, feats[:b], t_feats[:b], logits[b:], yr, feats[b:],
                                          t_logits[b:], _head(model), self.rkd, n_old, w)
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
        head = _head(model)
        counts = torch.bincount(torch.cat([task.y, self.pool_y]), minlength=head.out_features).float()
        weights = class_balance_weights(counts)
        opt = torch.optim.SGD(head.parameters(), lr=cfg.head_lr, momentum=cfg.momentum)
        with eval_mode(model):
            for _ in range(cfg.head_epochs):
                for idx in self._batches(len(task.y)):
                    xr, yr = self._replay_batch(len(idx))
                    with torch.no_grad():
                        _, feats = _forward(model, torch.cat([task.x[idx], xr]))
                        t_logits = teacher(pixel_values=xr).logits
                    logits = head(feats)
                    b = len(idx)
                    terms = finetune_losses(logits[:b], task.y[idx], logits[b:], yr, t_logits, n_old, weights,
                                            l_ce=cfg.weights["l_ce"], w_hkd=w_hkd)
                    opt.zero_grad()
                    sum(terms.values()).backward()
                    opt.step()

    def add_to_pool(self, task: TensorTask) -> None:
        """The replayed samples of the task's classes: inverted once (pmi / full_inversion) or real."""
        cfg = self.config
        if cfg.method in INVERTING:
            _, feats = collect_block_statistics(self.model, zip(task.x.split(500), task.y.split(500)))
            self.bank.add_classes(task.class_ids, feats, train_contrastive=False)
            targets, labels = replay_targets(self.bank, task.class_ids, cfg.replay_per_class, self.generator,
                                             selection="gaussian")
            inv = dataclasses.replace(cfg.inversion, mode="pmi" if cfg.method == "pmi" else "full",
                                      inversion_seed=cfg.seed * 1000 + task.class_ids[0])
            result = invert_bn(self.model, targets, inv)
            x = result.samples.detach()
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


def _head(model: nn.Module) -> nn.Linear:
    parent, key = classifier_linear(model)
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def learn_tasks(model: nn.Module, tasks: list[TensorTask], config: ResNetContinualConfig | None = None) -> dict:
    """Learn `tasks` in turn with ``config.method`` (see the module docstring); `model` is trained in place.

    Returns ``accuracy_matrix`` (row t: accuracy on each seen task after task t), the metrics of
    `hf_pmi.metrics.continual_metrics` (``a_last``, ``a_avg``, ...), ``inversion_seconds`` and
    ``inversion_passes`` (sums over the run), ``inverted_classes`` (class id -> times inverted),
    ``task_seconds`` and the first/last training loss per task. Every input is checked before any work.
    """
    config = config or ResNetContinualConfig()
    require_image_classifier(model)
    if config.method in INVERTING:
        require_batchnorm(model, config.method)
    _check_tasks(tasks, model)
    torch.manual_seed(config.seed)  # new head rows and RKD projections
    learner = _Learner(model, config)
    matrix: list[list[float | None]] = []
    losses, task_seconds = [], []
    for t, task in enumerate(tasks):
        t0 = time.perf_counter()
        n_old = sum(len(k.class_ids) for k in tasks[:t])
        teacher = None
        if t > 0:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        grow_classifier(model, len(task.class_ids), generator=learner.generator)
        losses.append(learner.train_task(task, teacher, n_old))
        row = [accuracy(model, k.x_test, k.y_test) for k in tasks[: t + 1]]
        matrix.append(row + [None] * (len(tasks) - t - 1))
        if t < len(tasks) - 1:
            learner.add_to_pool(task)
        task_seconds.append(time.perf_counter() - t0)
        if config.progress:
            print(f"[hf_pmi] {config.method} task {t}: accuracy on seen tasks {[round(a, 3) for a in row]}, "
                  f"{task_seconds[-1]:.0f} s (inversion {learner.inversion_seconds:.0f} s so far)", flush=True)
    counts = [len(k.y_test) for k in tasks]
    return {
        "accuracy_matrix": matrix, **continual_metrics(matrix, counts),
        "inversion_seconds": learner.inversion_seconds, "inversion_passes": learner.inversion_passes,
        "inverted_classes": learner.inverted, "task_seconds": task_seconds, "losses": losses,
    }
