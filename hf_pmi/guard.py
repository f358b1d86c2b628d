"""The divergence guard: a non-finite loss or weight stops the run with an error that says where.

`ContinualTrainer` checks the loss of every step (`check_loss`), its trainable weights after every
optimizer step (`DivergenceGuard`) and every weight before writing a checkpoint
(`check_weights`), so a run that blew up never ends with exit status 0 or a NaN checkpoint.

Example:
    >>> import torch
    >>> check_loss(torch.tensor(0.5), task=0, step=1)
    >>> check_loss(torch.tensor(float("nan")), task=2, step=7)
    Traceback (most recent call last):
    ...
    hf_pmi.guard.DivergenceError: Training diverged in task 2 at step 7: the loss is nan. ...
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

_FIX = (
    "Try a lower learning rate (--learning_rate), gradient clipping (--max_grad_norm 1.0), float32 instead of "
    "16-bit training, and check the inputs for NaN/inf pixels (and image_std for zeros)."
)


class DivergenceError(FloatingPointError):
    """The loss or the weights became NaN or infinite; nothing after that point was saved."""


def check_loss(loss: torch.Tensor, task: int, step: int) -> None:
    """Raise `DivergenceError` when `loss` is NaN or infinite."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise DivergenceError(
            f"Training diverged in task {task} at step {step}: the loss is {loss.detach().float().item()}. "
            f"No checkpoint of this task was written. {_FIX}"
        )


def non_finite_tensors(model: torch.nn.Module, trainable_only: bool = False) -> list[str]:
    """Names of the floating-point parameters (and buffers, unless `trainable_only`) holding NaN/inf."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    if not trainable_only:
        named += list(model.named_buffers())
    named = [(n, t) for n, t in named if t.is_floating_point()]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu().tolist()  # one sync
    return [n for (n, _), ok in zip(named, flags) if not ok]


def check_weights(model: torch.nn.Module, task: int, when: str, trainable_only: bool = False) -> None:
    """Raise `DivergenceError` when any weight of `model` is NaN or infinite."""
    bad = non_finite_tensors(model, trainable_only)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DivergenceError(
            f"Training diverged in task {task} ({when}): non-finite weights in {shown}. No checkpoint with these "
            f"weights was written. {_FIX}"
        )


class DivergenceGuard(TrainerCallback):
    """Checks the trainable weights after every optimizer step of the trainer's current task."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        check_weights(model, self.trainer.current_task, f"after step {state.global_step + 1}", trainable_only=True)
