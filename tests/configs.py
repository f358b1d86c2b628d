"""Method configs with budgets cut for speed (the schedules' structure is the reference's)."""

import dataclasses

from hf_pmi.bank import SamplingConfig
from hf_pmi.inversion import InversionConfig
from hf_pmi.methods.exemplar_replay import ExemplarConfig, ExemplarReplayConfig
from hf_pmi.methods.pmi import PMIConfig
from hf_pmi.replay import ReplayConfig

FAST_INVERSION = InversionConfig(layer_steps=3, first_block_steps=4, upsample_at=(1, 2, 3), refine_steps=3)


def fast_pmi(selection="gaussian", per_class=2, replay_batch_size=8, grid_samples=0, replay=None, **inversion):
    """A `PMIConfig` with a tiny inversion budget; keyword arguments override `FAST_INVERSION`'s fields."""
    return PMIConfig(
        replay=ReplayConfig(batch_size=replay_batch_size, grid_samples=grid_samples, **(replay or {})),
        inversion=dataclasses.replace(FAST_INVERSION, **inversion),
        sampling=SamplingConfig(per_class=per_class, selection=selection),
    )


def fast_exemplars(per_class=2, replay_batch_size=8):
    return ExemplarReplayConfig(replay=ReplayConfig(batch_size=replay_batch_size, grid_samples=0),
                                exemplars=ExemplarConfig(per_class=per_class))
