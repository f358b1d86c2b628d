"""The report of an inversion: steps, costs, timings, losses and the loss curve, merged over chunks.

Cost accounting (``full_model_passes``): one pass = one forward + backward of the whole vision
tower, blocks ``0 .. L+2``. A step that runs blocks ``i .. j`` forward and back counts
``sum(block_costs()[i..j])``: a per-layer step on block ``i`` counts ``block_costs()[i]``, a
refinement step from ``start_block`` counts ``sum(block_costs()[start_block:])``. The shares come
from multiply-adds; backward is taken to cost the same multiple of forward in every block, so
counting forward-only or forward+backward gives the same numbers.
"""

from __future__ import annotations


def merge_chunks(chunks, trackers, befores, n: int, per_layer: bool) -> dict:
    """The report fields of `hf_pmi.inversion.invert` built from its per-layer chunks.

    ``chunks[k]``: ``[(size, loss, curve)]`` per refinement chunk of per-layer chunk k (curves relative
    to the refinement's start); ``trackers[k]`` its `Tracker`; ``befores[k]`` the (passes, seconds)
    it spent before the refinement; `n` the number of targets; `per_layer` whether a per-layer stage ran.
    """
    pieces = [piece for refined in chunks for piece in refined]
    length = min(len(c) for _, _, c in pieces)
    curve = []
    for j in range(length):  # every chunk's per-layer stage plus every refinement chunk up to step j
        curve.append((
            sum(b[0] for b in befores) + sum(c[j][0] for _, _, c in pieces),
            sum(b[1] for b in befores) + sum(c[j][1] for _, _, c in pieces),
            sum(size * c[j][2] for size, _, c in pieces) / n,
        ))
    steps: dict[str, int] = {}
    stage_passes: dict[str, float] = {}
    stage_seconds: dict[str, float] = {}
    stage_loss: dict[str, float] = {}
    block_variance: dict[str, dict[str, float]] = {}
    for refined, tr in zip(chunks, trackers):
        for k, v in tr.block_variance.items():
            block_variance.setdefault(k, {"solved": 0.0, "real": v["real"]})["solved"] += v["solved"] / len(trackers)
        b = sum(size for size, _, _ in refined)
        for k, v in tr.stage_loss.items():
            stage_loss[k] = stage_loss.get(k, 0.0) + b * v / n
        steps.update(tr.steps)  # every chunk runs the same schedule
        for k, v in tr.stage_passes.items():
            stage_passes[k] = stage_passes.get(k, 0.0) + v
        for k, v in tr.stage_seconds.items():
            stage_seconds[k] = stage_seconds.get(k, 0.0) + v
    report = {
        "num_targets": n,
        "num_chunks": len(chunks),
        "steps": steps,
        "stage_passes": stage_passes,
        "stage_seconds": stage_seconds,
        "stage_loss": stage_loss,
        "block_variance": block_variance,
        "full_model_passes": sum(tr.passes for tr in trackers),
        "final_loss": sum(size * loss for size, loss, _ in pieces) / n,
        "curve": curve,
    }
    if per_layer and length:  # the loss the refinement started from
        report["start_loss"] = sum(size * c[0][2] for size, _, c in pieces) / n
    return report
