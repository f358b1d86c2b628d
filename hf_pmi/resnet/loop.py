"""The BatchNorm family's phases run by `transformers.Trainer`'s own loop (issue 30, part 2).

Each phase of a task (the first task's multi-step run; a later task's new-rows / last-block / everything
stages; the head fine-tuning) is one ``Trainer.train()`` of a `PhaseTrainer`, whose hooks give the phase:

- `get_train_dataloader`: the task's images in the old loop's batches (`EpochBatches`: one ``randperm`` of
  the learner's generator per epoch, split into ``batch_size`` chunks). The batches hold raw images;
  augmentation and replay draws happen in the loss, in the order the hand-written loop drew them;
- `create_optimizer`: the phase's SGD over the phase's parameters (`RowKeepingSGD`: the head rows of earlier
  classes are put back after every step, so they stay bit for bit);
- `create_scheduler`: the phase's multi-step schedule with its milestones converted from epochs to
  optimizer steps, or its one-cycle schedule over the phase's optimizer steps;
- `compute_loss`: the phase's loss (`hf_pmi.resnet.learner`: CE, LwF's KD, the replay losses with
  separate BN passes for real and replayed samples), after putting the phase's modules back in their
  train / eval modes (``Trainer.training_step`` sets the whole model to train mode).

So a BN run gets what `Trainer` gives: step losses logged to the ``report_to`` trackers and callbacks (the
steps count on across phases and tasks through `hf_pmi.tracking.ContinualCallbackHandler`), progress bars,
``gradient_accumulation_steps``, ``max_grad_norm`` clipping (over every trained parameter, the relation-KD
projections included), mixed precision and multi-process training. With one process,
``gradient_accumulation_steps=1`` and ``max_grad_norm=0`` (the reference never clips), a run is bit-equal to
the hand-written loop it replaced (``tests/test_resnet_loop.py``).

With several processes each process takes every n-th batch (accelerate's `BatchSamplerShard`: the global
batch is ``n x batch_size``); the learner's generator is synchronised from process 0 at every epoch, so all
processes draw the same batch order; gradients are averaged (DDP for the model, `RowKeepingSGD` for the
relation-KD projections, which are not part of the model).

Example:
    >>> import torch
    >>> batches = EpochBatches(10, 4, torch.Generator().manual_seed(0))
    >>> [len(b) for b in batches], len(batches)  # index lists
    ([4, 4, 2], 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import Trainer

from .training import LR_FACTOR


class EpochBatches:
    """Index batches of one epoch: a fresh permutation of ``range(n)`` from `generator`, in chunks of
    `batch_size` (the last one shorter), as the hand-written loop drew them."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, synchronise: bool = False):
        self.n, self.batch_size, self.generator, self.synchronise = n, batch_size, generator, synchronise
        self.drop_last = False  # read by accelerate's BatchSamplerShard

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        if self.synchronise:  # every process draws the same order: process 0's generator state
            from accelerate.utils import synchronize_rng_states

            synchronize_rng_states(["generator"], self.generator)
        for batch in torch.randperm(self.n, generator=self.generator).split(self.batch_size):
            yield batch.tolist()  # lists of ints: accelerate's BatchSamplerShard pads an uneven split with them


class TaskImages(torch.utils.data.Dataset):
    """A task's images and labels; a batch of indices gives ``{"pixel_values", "labels"}`` in one indexing."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx)
        return {"pixel_values": self.x[idx], "labels": self.y[idx]}


def _as_is(batch):  # the dataset already returns the whole batch
    return batch


class RowKeepingSGD(torch.optim.SGD):
    """SGD that, after each step, puts back the first ``n_old`` rows of the head's parameters (`keep`: pairs of
    parameter and kept rows), zeroes every gradient (the Trainer zeroes only the model's; the relation-KD
    projections are not in it) and, with several processes, first averages the gradients of `extra` (parameters
    outside the DDP-wrapped model)."""

    def __init__(self, params, keep=(), extra=(), **kwargs):
        super().__init__(params, **kwargs)
        self.keep, self.extra = list(keep), list(extra)

    @torch.no_grad()
    def step(self, closure=None):
        if self.extra and torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.extra:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        loss = super().step(closure)
        for p, rows in self.keep:
            p[: len(rows)].copy_(rows)
        self.zero_grad()
        return loss


@dataclass
class PhaseSpec:
    """What one phase trains: ``params`` (in the optimizer's order), its SGD settings, ``epochs``,
    ``milestones`` (fractions of the epochs where the lr drops x0.1, or ``"one_cycle"``), the images, the
    ``loss(model, pixel_values, labels)``, ``modes()`` (puts the phase's train / eval modes back) and the kept
    head rows / extra parameters of `RowKeepingSGD`."""

    params: list[nn.Parameter]
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    epochs: int
    milestones: tuple[float, ...] | str
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    loss: Callable
    modes: Callable[[], None]
    keep: list = ()
    extra: list = ()
    name: str = "phase"


class PhaseTrainer(Trainer):
    """A `Trainer` whose every ``train()`` runs one `PhaseSpec` (see the module docstring); `run` does it.

    `handler`: the callback handler to use (`ContinualTrainer`'s, so its trackers see one run); by default the
    Trainer's own, wrapped in a `ContinualCallbackHandler` (steps count on across phases)."""

    def __init__(self, model: nn.Module, args, generator: torch.Generator, handler=None):
        from ..tracking import ContinualCallbackHandler

        super().__init__(model=model, args=args)
        self.callback_handler = ContinualCallbackHandler.from_handler(handler or self.callback_handler)
        self.generator, self.spec = generator, None

    def run(self, spec: PhaseSpec) -> None:
        """Train one phase: a fresh optimizer and schedule, ``spec.epochs`` epochs over ``spec.x``."""
        self.spec = spec
        self.args.num_train_epochs, self.args.max_steps = spec.epochs, -1
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model  # a new DDP wrapper: each phase trains other parameters
        try:
            with torch.random.fork_rng(devices=[]):  # Trainer.train draws from the global generator; the run's
                self.train()                          # relation-KD projections draw from it after this phase
        finally:
            self.spec = None
        if self.accelerator.num_processes > 1:  # every process leaves the phase with process 0's state: the
            from accelerate.utils import synchronize_rng_states  # BN moments (DDP broadcast them before each

            for buffer in self.model.buffers():  # forward, then each process updated them on its batch) and the
                torch.distributed.broadcast(buffer.data, 0)  # generator (its last batches differ in size)
            synchronize_rng_states(["generator"], self.generator)
        self.callback_handler.end_task(self.state.global_step)  # trackers' steps go on with the next phase

    def get_train_dataloader(self):
        spec = self.spec
        batches = EpochBatches(len(spec.y), spec.batch_size, self.generator,
                               synchronise=self.accelerator.num_processes > 1)
        loader = torch.utils.data.DataLoader(TaskImages(spec.x, spec.y), batch_sampler=batches, collate_fn=_as_is)
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model=None):
        spec = self.spec
        if self.optimizer is None:
            self.optimizer = RowKeepingSGD(spec.params, keep=spec.keep, extra=spec.extra, lr=spec.lr,
                                           momentum=spec.momentum, weight_decay=spec.weight_decay,
                                           nesterov=spec.nesterov)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        spec, opt = self.spec, optimizer or self.optimizer
        if self.lr_scheduler is None:
            per_epoch = num_training_steps // spec.epochs  # optimizer steps per epoch
            if spec.milestones == "one_cycle":
                self.lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, spec.lr, epochs=spec.epochs,
                                                                        steps_per_epoch=per_epoch)
            else:  # the drop after epoch m comes after m epochs' optimizer steps
                marks = sorted({int(spec.epochs * f) * per_epoch for f in spec.milestones})
                self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=LR_FACTOR)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.spec.modes()  # training_step put the whole model in train mode
        loss = self.spec.loss(model, inputs["pixel_values"], inputs["labels"])
        return (loss, None) if return_outputs else loss

    def _clip_grad_norm(self, model):  # every trained parameter, the relation-KD projections included
        return self.accelerator.clip_grad_norm_(self.spec.params, self.args.max_grad_norm)


def phase_arguments(args, model: nn.Module, config, output_dir: str | None):
    """The `TrainingArguments` of a run's `PhaseTrainer`: a copy of `args` (a `ContinualConfig` or plain
    `TrainingArguments`) that saves, evaluates and pushes nothing itself (the task loop does, per task), with the
    run's batch size and seed. Without `args`: the reference's choices (one process step per batch, no clipping:
    ``max_grad_norm=0``), no trackers, no progress bars, on the model's device."""
    import copy
    import tempfile

    from transformers import TrainingArguments
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    if args is None:
        args = TrainingArguments(
            output_dir=output_dir or tempfile.mkdtemp(prefix="hf_pmi_bn_"), max_grad_norm=0.0, report_to="none",
            disable_tqdm=True, use_cpu=next(model.parameters()).device.type == "cpu", logging_strategy="no")
    args = copy.copy(args)
    args.save_strategy, args.eval_strategy = SaveStrategy.NO, IntervalStrategy.NO
    args.push_to_hub, args.load_best_model_at_end, args.resume_from_checkpoint = False, False, None
    args.per_device_train_batch_size, args.seed = config.batch_size, config.seed
    if output_dir:
        args.output_dir = output_dir
    return args


def phase_trainer(model: nn.Module, generator: torch.Generator, config, args=None, handler=None,
                  output_dir: str | None = None) -> PhaseTrainer:
    """The run's `PhaseTrainer` (see `phase_arguments`); without `args` it prints nothing (no `PrinterCallback`).
    Building a `Trainer` seeds every generator with ``config.seed``: build it before the run seeds its own."""
    from transformers.trainer_callback import PrinterCallback

    trainer = PhaseTrainer(model, phase_arguments(args, model, config, output_dir), generator, handler)
    if args is None:
        trainer.remove_callback(PrinterCallback)
    return trainer
