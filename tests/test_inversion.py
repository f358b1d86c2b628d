"""The inversion engine: per-block progress, cost accounting, determinism, replay buffer."""

import dataclasses

import pytest
import torch

from hf_pmi.bank import FeatureBank
from hf_pmi.blocks import VisionBlocks
from hf_pmi.inversion import InversionConfig, _adam_loop, _Objective, _Tracker, invert, synthesize_replay, total_variation
from hf_pmi.statistics import collect_layer_statistics
from hf_pmi.testing import build_clip

# Small budgets: the schedule's structure is the reference's, its lengths are cut for speed.
FAST = dict(layer_steps=6, first_block_steps=8, upsample_at=(2, 4, 6), refine_steps=5, full_steps=7)


@pytest.fixture(scope="module")
def setup():
    model = build_clip("tiny")
    g = torch.Generator().manual_seed(0)
    stats = collect_layer_statistics(model, [torch.randn(16, 3, 32, 32, generator=g)])
    return model, stats


def test_single_encoder_block_inversion_lowers_its_loss_tenfold(setup):
    model, stats = setup
    blocks = VisionBlocks(model)
    config = InversionConfig()
    obj = _Objective(blocks, stats, config, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reachable target: the layer applied to a realistic input
        target = blocks.block(3, obj.sample_input(3, 8, g))
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        z0 = obj.sample_input(3, 8, g)
        initial = obj.block_loss(3, z0, target).item()
        _, best = _adam_loop(lambda v: obj.block_loss(3, v, target), z0, 150, 0.1, _Tracker(150, False, ""), "b", 0.0, True)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert best < initial / 10, (initial, best)


def test_invert_report_shapes_and_cost_accounting(setup):
    model, stats = setup
    blocks = VisionBlocks(model)
    costs = blocks.block_costs()
    config = InversionConfig(batch_size=3, **FAST)
    result = invert(model, torch.randn(5, 16), stats, config, progress=False)
    rep = result.report
    assert result.samples.shape == (5, 32, 8, 8)
    assert rep["num_chunks"] == 2
    assert rep["steps"] == {"block4": 6, "block3": 6, "block2": 6, "block1": 8, "refine": 5}
    per_chunk = 6 * costs[4] + 6 * costs[3] + 6 * (costs[1] + costs[2]) + 8 * costs[1] + 5 * sum(costs[1:])
    assert rep["full_model_passes"] == pytest.approx(2 * per_chunk)
    assert len(rep["curve"]) == 5
    passes = [c[0] for c in rep["curve"]]
    assert passes == sorted(passes) and passes[-1] == pytest.approx(rep["full_model_passes"])
    assert rep["final_feature_mse"] >= 0 and rep["seconds"] > 0
    full = invert(model, torch.randn(5, 16), stats, dataclasses.replace(config, mode="full"), progress=False).report
    assert full["steps"] == {"full": 7} and len(full["curve"]) == 7
    assert full["full_model_passes"] == pytest.approx(2 * 7 * sum(costs[1:]))


def test_refinement_lowers_the_full_model_loss(setup):
    model, stats = setup
    config = InversionConfig(batch_size=8, mode="full", full_steps=60, full_lr=0.1)
    rep = invert(model, torch.randn(8, 16), stats, config, progress=False).report
    assert rep["final_loss"] < 0.5 * rep["curve"][0][2]


def test_deterministic_for_a_seed_and_model_untouched(setup):
    model, stats = setup
    model.train()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    targets = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    config = InversionConfig(batch_size=4, inversion_seed=3, **FAST)
    a = invert(model, targets, stats, config, progress=False).samples
    b = invert(model, targets, stats, config, progress=False).samples
    c = invert(model, targets, stats, dataclasses.replace(config, inversion_seed=4), progress=False).samples
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    model.eval()


def test_pixel_inversion_start_block_zero(setup):
    model, stats = setup
    config = InversionConfig(batch_size=4, start_block=0, **FAST)
    rep = invert(model, torch.randn(4, 16), stats, config, progress=False)
    assert rep.samples.shape == (4, 3, 32, 32) and "block0" in rep.report["steps"]


def test_total_variation_definition():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0  # one bright pixel: 2 of 6 right (and down) diffs, 2 of 4 per diagonal are 1
    assert total_variation(x).item() == pytest.approx(2 / 6 + 2 / 6 + 2 / 4 + 2 / 4)


def test_synthesize_replay_shapes_labels_and_determinism(setup):
    model, stats = setup
    bank = FeatureBank()
    g = torch.Generator().manual_seed(0)
    bank.add_classes(range(3), {c: torch.randn(10, 16, generator=g) + c for c in range(3)}, contrastive_epochs=2)
    with pytest.raises(ValueError, match="update_statistics"):
        synthesize_replay(model, bank, [0, 1], InversionConfig(**FAST), progress=False)
    bank.update_statistics(stats)
    config = InversionConfig(per_class=2, batch_size=4, boost=2, **FAST)
    x, y, rep = synthesize_replay(model, bank, [2, 0, 1], config, progress=False)
    assert x.shape == (6, 32, 8, 8) and y.tolist() == [2, 2, 0, 0, 1, 1]
    assert rep["classes"] == [2, 0, 1] and rep["num_processes"] == 1
    x2, _, _ = synthesize_replay(model, bank, [2, 0, 1], config, progress=False)
    assert torch.equal(x, x2)


class _TwoProcessAccelerator:
    """Simulates rank `rank` of 2: gather concatenates this rank's tensor with a stored peer tensor."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, rank, peer=None):
        self.process_index, self.peer, self.sent = rank, peer or [], []

    def gather(self, t):
        self.sent.append(t)
        other = self.peer.pop(0)
        return torch.cat([t, other] if self.process_index == 0 else [other, t])


def test_synthesize_replay_shards_pads_and_gathers(setup):
    model, stats = setup
    bank = FeatureBank()
    g = torch.Generator().manual_seed(0)
    bank.add_classes(range(3), {c: torch.randn(10, 16, generator=g) + c for c in range(3)}, train_contrastive=False)
    bank.update_statistics(stats)
    config = InversionConfig(per_class=2, batch_size=4, selection="gaussian", **FAST)
    rank1 = _TwoProcessAccelerator(1, peer=[torch.zeros(4, 32, 8, 8), torch.zeros(4, dtype=torch.long)])
    _, _, rep1 = synthesize_replay(model, bank, [0, 1, 2], config, accelerator=rank1, progress=False)
    assert rep1["classes"] == [1]
    sent_x, sent_y = rank1.sent
    assert sent_x.shape == (4, 32, 8, 8) and sent_y.tolist() == [1, 1, -1, -1]  # padded to 2 classes
    rank0 = _TwoProcessAccelerator(0, peer=[sent_x, sent_y])
    x, y, rep0 = synthesize_replay(model, bank, [0, 1, 2], config, accelerator=rank0, progress=False)
    assert rep0["classes"] == [0, 2]
    assert y.tolist() == [0, 0, 1, 1, 2, 2] and x.shape == (6, 32, 8, 8)
    assert torch.equal(x[2:4], sent_x[:2])


def test_patch_maps_back_to_images(tmp_path):
    from hf_pmi.visualize import patch_maps_to_images, patch_maps_to_pixels, save_image_grid

    model = build_clip("mini")  # hidden 128 >= 3*4*4: the patch embedding is injective
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    pixels = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    patch_maps = VisionBlocks(model).patch_embed(pixels).detach()
    assert torch.allclose(patch_maps_to_pixels(model, patch_maps), pixels, atol=1e-3)
    back = patch_maps_to_images(model, patch_maps, mean, std)
    assert back.shape == (2, 32, 32, 3) and (abs(back.astype(int) - images.numpy().astype(int)) <= 1).all()
    save_image_grid(back, [0, 1], ["zero", "one"], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("init", ["forward", "target"])
def test_layer_init_from_chain_beats_noise_start(setup, init):
    """'forward' / 'target' starts (beyond the reference) give the encoder layers a lower block loss than
    the reference's independent noise starts, and a better start for the refinement."""
    model, stats = setup
    targets = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    config = InversionConfig(batch_size=8, layer_steps=10, first_block_steps=4, upsample_at=(1, 2, 3), refine_steps=1,
                             cls_target_last_layer=True)
    reps = {k: invert(model, targets, stats, dataclasses.replace(config, layer_init=k), progress=False).report
            for k in ("noise", init)}
    layer_loss = {k: r["stage_loss"]["block3"] for k, r in reps.items()}
    assert layer_loss[init] < layer_loss["noise"], layer_loss
    # the 'forward' / 'target' start runs blocks 1..L+1 forward once, counted as a pass of those blocks
    costs = VisionBlocks(model).block_costs()
    assert reps[init]["steps"]["forward_init"] == 1
    assert reps[init]["full_model_passes"] == pytest.approx(reps["noise"]["full_model_passes"] + sum(costs[1:4]))
    with pytest.raises(ValueError, match="layer_init"):
        InversionConfig(layer_init="zeros")


def test_forward_trajectory_is_a_consistent_chain(setup):
    model, stats = setup
    blocks = VisionBlocks(model)
    obj = _Objective(blocks, stats, InversionConfig(), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        traj = obj.forward_trajectory(4, torch.Generator().manual_seed(0))
        for i in range(1, blocks.num_blocks - 1):
            assert torch.allclose(blocks.block(i, traj[i]), traj[i + 1], atol=1e-5)
        assert torch.allclose(obj.pre_ln(traj[-1]), traj[2], atol=1e-5)  # the first layer's pre-LN start
        # the exact inverse of the pre block used by 'target'
        assert torch.allclose(blocks.pre(obj.pre_inverse(traj[2]))[:, 1:], traj[2][:, 1:], atol=1e-2)
