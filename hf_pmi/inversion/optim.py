"""The optimisation loops every inversion stage runs, and the tracker that counts their cost.

`Tracker` counts full-model-equivalent passes (a step on blocks i..j counts their share of the
tower's multiply-adds, `hf_pmi.blocks.VisionBlocks.block_costs`) and wall time, and holds the
progress bar. `adam_loop` minimises an objective over one variable; `coarse_to_fine` grows a
coarse variable x2 at given steps, with a fresh optimiser at each size.

Example:
    >>> import torch
    >>> tracker = Tracker(10, progress=False, desc="demo")
    >>> z, loss = adam_loop(lambda v: (v - 3).pow(2).sum(), torch.zeros(2), 10, 0.5, tracker, "demo", 0.25, True)
    >>> tracker.steps["demo"], tracker.passes, loss < 18
    (10, 2.5, True)
"""

from __future__ import annotations

import math
import time

import torch

from .objective import upsample

class Tracker:
    """Counts full-model-equivalent passes and wall time; holds the tqdm bar."""

    def __init__(self, total_steps: int, progress: bool, desc: str):
        from tqdm.auto import tqdm

        self.passes = 0.0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False)
        self.stage_passes: dict[str, float] = {}
        self.stage_seconds: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self.stage_loss: dict[str, float] = {}
        self.block_variance: dict[str, dict[str, float]] = {}

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def step(self, stage: str, cost: float, loss: float) -> None:
        self.passes += cost
        self.stage_passes[stage] = self.stage_passes.get(stage, 0.0) + cost
        self.steps[stage] = self.steps.get(stage, 0) + 1
        self.bar.update(1)
        self.bar.set_postfix_str(f"{stage} loss={loss:.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def adam_loop(objective_fn, z, steps, lr, tracker, stage, cost, keep_best, t_max=None, curve=None, project=None):
    """Minimise objective_fn(z) over z with Adam (cosine schedule of period `t_max` if given; `project`
    applied to z after each step); returns (best or last z, its loss)."""
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t_max)) if t_max is not None else None
    best_loss, best = math.inf, z.detach().clone()
    t_stage = time.perf_counter()
    for _ in range(steps):
        loss = objective_fn(z)
        (grad,) = torch.autograd.grad(loss, z)
        value = loss.item()
        if value < best_loss:
            best_loss, best = value, z.detach().clone()
        z.grad = grad
        opt.step()
        if project is not None:
            with torch.no_grad():
                z.copy_(project(z))
        if sched is not None:
            sched.step()
        tracker.step(stage, cost, value)
        if curve is not None:
            curve.append((tracker.passes, tracker.seconds, value))
    tracker.stage_seconds[stage] = tracker.stage_seconds.get(stage, 0.0) + time.perf_counter() - t_stage
    tracker.stage_loss[stage] = min(tracker.stage_loss.get(stage, math.inf), best_loss)
    if not keep_best and steps > 0:  # return the last iterate, with its loss (a forward for the report only)
        best = z.detach().clone()
        with torch.no_grad():
            best_loss = objective_fn(best).item()
    return best, best_loss


def coarse_to_fine(loss_fn, z, full_size, steps, upsample_at, lr, tracker, stage, cost, keep_best,
                    t_max=None, curve=None, project=None):
    """Optimise a coarse map `z` through ``loss_fn(coarse)`` (which up-samples it itself); `z` is
    up-sampled x2 (capped at `full_size`) with a fresh Adam (and schedule) at each of `upsample_at`.
    Returns (the map at the last size, its loss)."""
    bounds = [s for s in sorted(upsample_at) if 0 < s < steps] + [steps]
    best_loss, best, done = math.inf, z, 0
    for end in bounds:
        if done > 0 and z.shape[-1] < full_size:  # the stage boundary: grow the variable
            z = upsample(z.detach(), min(2 * z.shape[-1], full_size))
        z, loss = adam_loop(loss_fn, z, end - done, lr, tracker, stage, cost, keep_best, t_max, curve, project)
        if loss < best_loss or not keep_best:
            best_loss, best = loss, z
        done = end
    return best, best_loss

