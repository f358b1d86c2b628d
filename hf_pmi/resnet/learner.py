"""`Learner`: one task of the BatchNorm family's loop (`hf_pmi.resnet.continual.learn_tasks`): its training
phases, the head fine-tuning and the replay pool.

Training a task (`Learner.train_task`) runs the phases of `hf_pmi.resnet.training` (the reference's stages, or
one one-cycle run with ``schedule="one_cycle"``). Real and replayed samples go through the network in separate
forward passes (separate BN batch moments, as both references do); the teacher's logits on the pool are
computed once per task (the reference stores them with its buffer); the relation-KD projections are built anew
for every task (the reference's ``prepare_before_training``); the classes of every batch (real and replayed
labels) are counted from ones up, and the head fine-tuning weighs its CE by these counts (the reference's
``cls_count``).

The pool (`Learner.add_to_pool`, after a task): ``pmi`` / ``full_inversion`` fit the task's class Gaussians of
pooled features (and, with ``selection="cfs"``, a contrastive model per class), draw targets (CFS with the
reference's ``cont_step`` 40 and ``cont_rslt`` 0.5, or plain Gaussian draws) and invert them with `invert_bn`.
With ``regenerate`` (reference) the Gaussians and contrastive models of the old classes are re-fitted on the
pool seen through the new model, and every seen class is inverted anew into a fresh pool; without it each class
is inverted once, after its task, and kept. ``exemplar_replay`` keeps real images instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..bank import FeatureBank
from ..contrastive import SelectionConfig
from ..statistics import eval_mode
from .heads import classifier_layer, feature_dim
from .inversion import invert_bn, replay_targets
from .loop import PhaseSpec
from .losses import (
    RelationKD,
    balancing_ce,
    class_balance_weights,
    finetune_losses,
    hard_kd,
    local_ce,
    replay_losses,
    task_weights,
    total_loss,
)
from .statistics import collect_block_statistics
from .training import (
    Phase,
    apply_phase_modes,
    augment,
    first_task_phase,
    later_task_phases,
    restore_flags,
    set_phase_modes,
    stage_epochs,
)

INVERTING = ("pmi", "full_inversion")
# The train_head stage of the reference weighs the hard KD by hkd_factor * 0.01.
HEAD_STAGE_HKD = 0.01
# Contrastive models as the reference's buffer trains them (drop_last loader, weights after the best step).
CONTRASTIVE = SelectionConfig(preset="reference").contrastive_kwargs()


def forward(model: nn.Module, x: torch.Tensor, head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled features) of `x`: the classifier's input is captured by a pre-hook on `head` (default:
    `model`'s; give the bare model's head when `model` is wrapped, e.g. for DDP)."""
    store = {}
    handle = (head or classifier_layer(model)).register_forward_pre_hook(lambda _m, args: store.__setitem__("f", args[0]))
    try:
        logits = model(pixel_values=x).logits
    finally:
        handle.remove()
    # under mixed precision the features are half precision while the logits come back as float32 (accelerate):
    # the losses that reuse them with the head outside the model's autocast need the logits' precision
    return logits, store["f"].to(logits.dtype)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    with eval_mode(model):
        return torch.cat([model(pixel_values=b.to(device)).logits for b in x.split(500)])


class Learner:
    def __init__(self, model: nn.Module, config: "ResNetContinualConfig", loop=None,  # noqa: F821 (from .continual; not imported: no cycle)
                 generator: torch.Generator | None = None):
        self.model, self.config = model, config
        self.loop = loop  # the `PhaseTrainer` that runs each phase (`hf_pmi.resnet.loop`); set by learn_tasks
        self.device = next(model.parameters()).device  # tasks and the pool stay on the CPU; batches move here
        self.generator = generator or torch.Generator().manual_seed(config.seed)  # shared with the loop's batches
        self.pool_x: torch.Tensor | None = None  # replayed samples of every old class
        self.pool_y: torch.Tensor | None = None
        self.pool_teacher: torch.Tensor | None = None  # the teacher's logits on the pool (this task's)
        self.inverted: dict[int, int] = {}  # class id -> times inverted
        self.inversion_seconds, self.inversion_passes = 0.0, 0.0
        self.rkd: RelationKD | None = None
        self.bank = FeatureBank(covariance="diag")  # class Gaussians of pooled features: the inversion targets
        self.class_counts: torch.Tensor | None = None  # classes seen in this task's batches (from ones)

    # ----- batches -----------------------------------------------------------------------------
    def _replay_batch(self, size: int):
        """`size` pool samples, without replacement when the pool is large enough (reference: random.sample)."""
        n = len(self.pool_y)
        idx = (torch.randperm(n, generator=self.generator)[:size] if size <= n
               else torch.randint(0, n, (size,), generator=self.generator))
        return self.pool_x[idx].to(self.device), self.pool_y[idx].to(self.device), self.pool_teacher[idx].to(self.device)

    # ----- training ----------------------------------------------------------------------------
    def train_task(self, task: "TensorTask", teacher: nn.Module | None, n_old: int) -> dict[str, float]:
        cfg, model = self.config, self.model
        replay = teacher is not None and self.pool_y is not None and cfg.method not in ("finetune", "lwf")
        head = classifier_layer(model)
        self.class_counts = torch.ones(head.out_features)  # reference: cls_count = torch.ones(num_classes)
        w = None
        if replay:
            self.rkd = RelationKD(feature_dim(model)).to(self.device)  # new projections for every task (reference)
            w = task_weights(n_old, len(task.class_ids), **cfg.weights)
            self.pool_teacher = _logits(teacher, self.pool_x, self.device).cpu()
        if teacher is None:
            phases = first_task_phase(cfg.epochs, cfg.lr, cfg.schedule)
        else:
            epochs = cfg.later_epochs if cfg.schedule == "one_cycle" else (tuple(cfg.stage_epochs) if cfg.stage_epochs
                                                                          else stage_epochs(cfg.later_epochs))
            phases = later_task_phases(model, cfg.schedule, epochs, tuple(cfg.stage_lrs), cfg.lr, cfg.last_stage)
        kept = [p[:n_old].detach().clone() for p in head.parameters()] if n_old else []
        self._losses = []
        for phase in phases:
            extra = list(self.rkd.parameters()) if replay and phase.rkd else []
            keep = list(zip(head.parameters(), kept)) if phase.new_rows_only else []  # in no optimiser: put back
            self._run_phase(task, phase, cfg.momentum, extra, keep,
                            lambda m, x, y, phase=phase: self._loss(m, x, y, teacher, n_old, w, phase))
        model.train()
        if replay and cfg.head_epochs:  # R-DFCIL's head fine-tuning: the body frozen and in eval mode
            weights = class_balance_weights(self.class_counts).to(self.device)
            phase = Phase("head", cfg.head_epochs, cfg.head_lr, [], False, False)
            self._run_phase(task, phase, cfg.momentum, [], [],
                            lambda m, x, y: self._head_loss(m, x, y, n_old, weights, w["hkd"]))
            model.train()
        return {"first_loss": self._losses[0] if self._losses else None,
                "last_loss": self._losses[-1] if self._losses else None}

    def _run_phase(self, task, phase: Phase, momentum: float, extra, keep, loss) -> None:
        """One ``Trainer.train()`` of the loop (`hf_pmi.resnet.loop`) over the phase's parameters."""
        if phase.epochs <= 0:
            return
        model = self.model
        flags = set_phase_modes(model, phase)
        try:
            params = [p for p in model.parameters() if p.requires_grad] + extra
            self.loop.run(PhaseSpec(
                params=params, lr=phase.lr, momentum=momentum, weight_decay=self.config.weight_decay,
                nesterov=phase.nesterov, epochs=phase.epochs, milestones=phase.milestones, x=task.x, y=task.y,
                batch_size=self.config.batch_size, loss=loss, modes=lambda: apply_phase_modes(model, phase),
                keep=keep, extra=extra, name=phase.name))
        finally:
            restore_flags(flags)

    def _loss(self, model, x, y, teacher, n_old: int, w: dict | None, phase: Phase) -> torch.Tensor:
        """A training phase's loss on a batch of real images `x` (augmented here) and, for replay, as many pool
        samples; `model` is the one the Trainer steps (maybe wrapped for DDP), `self.model` the bare one."""
        cfg, head = self.config, classifier_layer(self.model)
        x = augment(x, cfg.shift, cfg.flip, self.generator, cfg.crop_fill)
        logits, feats = forward(model, x, head)
        if w is None:  # finetune, lwf, the first task
            self.class_counts += torch.bincount(y.cpu(), minlength=len(self.class_counts)).float()
            loss = F.cross_entropy(logits, y)
            if teacher is not None and cfg.method == "lwf":
                with torch.no_grad():
                    t_logits = teacher(pixel_values=x).logits
                T = cfg.lwf_temperature
                kd = F.kl_div(F.log_softmax(logits[:, :n_old] / T, -1), F.softmax(t_logits / T, -1),
                              reduction="batchmean") * T * T
                loss = loss + cfg.l_lwf * kd
        else:
            xr, yr, tr = self._replay_batch(len(y))
            logits_r, feats_r = forward(model, xr, head)  # a BN pass of its own
            self.class_counts += torch.bincount(torch.cat([y, yr]).cpu(), minlength=len(self.class_counts)).float()
            if phase.rkd:
                with torch.no_grad():
                    _, t_feats = forward(teacher, x)
                terms = replay_losses(logits, y, feats, t_feats, logits_r, yr, feats_r, tr, head, self.rkd, n_old, w)
            else:  # the reference's train_head: local CE, hard KD x 0.01, balancing CE; no relation KD
                terms = {"ce": w["ce"] * local_ce(logits, y, n_old),
                         "hkd": HEAD_STAGE_HKD * w["hkd"] * hard_kd(logits_r, tr[:, :n_old]),
                         "ft": w["ft"] * balancing_ce(head, feats, y, feats_r, yr)}
            loss = total_loss(terms, cfg.loss_form)
        self._losses.append(loss.item())
        return loss

    def _head_loss(self, model, x, y, n_old: int, weights: torch.Tensor, w_hkd: float) -> torch.Tensor:
        """R-DFCIL's head fine-tuning loss: CE weighted by the classes seen in this task's batches, on real plus
        replayed samples (separate passes), and the hard KD. Only the head takes gradients (the body is frozen)."""
        cfg, head = self.config, classifier_layer(self.model)
        xr, yr, tr = self._replay_batch(len(y))
        x = augment(x, cfg.shift, cfg.flip, self.generator, cfg.crop_fill)
        logits, _ = forward(model, x, head)
        logits_r, _ = forward(model, xr, head)
        if cfg.head_counts == "running":  # weights from the counts so far, then this batch counted
            weights = class_balance_weights(self.class_counts).to(self.device)
            self.class_counts += torch.bincount(torch.cat([y, yr]).cpu(), minlength=len(self.class_counts)).float()
        terms = finetune_losses(logits, y, logits_r, yr, tr, n_old, weights, l_ce=cfg.weights["l_ce"], w_hkd=w_hkd)
        return sum(terms.values())

    # ----- the pool ----------------------------------------------------------------------------
    def per_class(self, tasks_done: int, num_classes: int) -> int:
        """Samples per class: ``replay_per_class``, or the reference's buffer (``init_samples + tasks_done x
        per_task_samples`` for all ``num_classes`` classes) when ``init_samples`` is set."""
        cfg = self.config
        if cfg.init_samples is None:
            return cfg.replay_per_class
        return max(1, math.ceil((cfg.init_samples + tasks_done * cfg.per_task_samples) / num_classes))

    def _targets(self, classes: list[int], per_class: int):
        cfg = self.config
        kwargs = {}
        if cfg.selection == "cfs":  # reference: batch = max(n_c // cont_step, 2), rate cont_rslt, no boost, torch.std
            kwargs = dict(boost=1, cfs_step=cfg.cfs_step, rho=cfg.cfs_rho, unbiased_std=True)
        return replay_targets(self.bank, classes, per_class, self.generator, selection=cfg.selection,
                              target_classes=cfg.target_classes, **kwargs)

    def add_to_pool(self, task: "TensorTask", tasks_done: int) -> None:
        """The replayed samples after `task` (see the module docstring); `tasks_done` counts the tasks learnt."""
        cfg = self.config
        if cfg.method in INVERTING:
            size = task.x.shape[-1]
            stats, feats = collect_block_statistics(self.model, zip(task.x.split(500), task.y.split(500)), image_size=size)
            cfs = cfg.selection == "cfs"
            contrastive = dict(train_contrastive=cfs, seed=cfg.seed, **CONTRASTIVE)
            if cfg.regenerate and self.pool_y is not None:
                _, old = collect_block_statistics(self.model, zip(self.pool_x.split(500), self.pool_y.split(500)),
                                                  image_size=size)  # the old classes through the new model
                bank = FeatureBank(covariance="diag")
                bank.statistics = self.bank.statistics
                bank.add_classes(sorted({**old, **feats}), {**old, **feats}, **contrastive)
                self.bank = bank
                classes = sorted({**old, **feats})
            else:
                self.bank.add_classes(task.class_ids, feats, **contrastive)
                classes = list(task.class_ids)
            self.bank.update_statistics(stats)  # merged real block-input moments: input_prior="recorded"
            targets, labels = self._targets(classes, self.per_class(tasks_done, task.class_ids[-1] + 1))
            import dataclasses

            inv = dataclasses.replace(cfg.inversion, mode="pmi" if cfg.method == "pmi" else "full",
                                      inversion_seed=cfg.seed * 1000 + tasks_done)
            result = invert_bn(self.model, targets, inv, input_stats=self.bank.statistics, image_size=size)
            x = result.samples.detach().cpu()
            self.inversion_seconds += result.report["seconds"]
            self.inversion_passes += result.report["full_model_passes"]
            for c in classes:
                self.inverted[c] = self.inverted.get(c, 0) + 1
            if cfg.regenerate:
                self.pool_x, self.pool_y = x, labels
                return
        elif cfg.method == "exemplar_replay":
            keep = [torch.nonzero(task.y == c).flatten() for c in task.class_ids]
            n = self.per_class(tasks_done, task.class_ids[-1] + 1)
            keep = torch.cat([k[torch.randperm(len(k), generator=self.generator)[:n]] for k in keep])
            x, labels = task.x[keep], task.y[keep]
        else:
            return
        self.pool_x = x if self.pool_x is None else torch.cat([self.pool_x, x])
        self.pool_y = labels if self.pool_y is None else torch.cat([self.pool_y, labels])

    # ----- state -------------------------------------------------------------------------------
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
        import os

        from .checkpoint import BANK_DIR

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
