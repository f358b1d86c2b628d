"""The inversion engine: per-block progress, cost accounting, determinism, replay buffer."""

import dataclasses
import math

import pytest
import torch

from hf_pmi.bank import FeatureBank, SamplingConfig
from hf_pmi.blocks import VisionBlocks
from hf_pmi.contrastive import SelectionConfig
from hf_pmi.inversion import InversionConfig, Objective, invert, total_variation
from hf_pmi.inversion.optim import Tracker, adam_loop
from hf_pmi.statistics import collect_layer_statistics
from hf_pmi.synthesis import synthesize_replay
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
    obj = Objective(blocks, stats, config, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reachable target: the layer applied to a realistic input
        target = blocks.block(3, obj.sample_input(3, 8, g))
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        z0 = obj.sample_input(3, 8, g)
        initial = obj.block_loss(3, z0, target).item()
        _, best = adam_loop(lambda v: obj.block_loss(3, v, target), z0, 150, 0.1, Tracker(150, False, ""), "b", 0.0, True)
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
    full = invert(model, torch.randn(5, 16), stats, config, mode="full", progress=False).report
    assert full["steps"] == {"full": 7} and len(full["curve"]) == 7
    assert full["full_model_passes"] == pytest.approx(2 * 7 * sum(costs[1:]))


def test_refinement_lowers_the_full_model_loss(setup):
    model, stats = setup
    config = InversionConfig(batch_size=8, full_steps=60, full_lr=0.1)
    rep = invert(model, torch.randn(8, 16), stats, config, mode="full", progress=False).report
    assert rep["final_loss"] < 0.5 * rep["curve"][0][2]


def test_deterministic_for_a_seed_and_model_untouched(setup):
    model, stats = setup
    model.train()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    targets = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    config = InversionConfig(batch_size=4, seed=3, **FAST)
    a = invert(model, targets, stats, config, progress=False).samples
    b = invert(model, targets, stats, config, progress=False).samples
    c = invert(model, targets, stats, dataclasses.replace(config, seed=4), progress=False).samples
    assert torch.equal(invert(model, targets, stats, config, seed=4, progress=False).samples, c)  # the argument wins
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
    config = InversionConfig(batch_size=4, **FAST)
    sampling, selection = SamplingConfig(per_class=2), SelectionConfig(boost=2)
    x, y, t, rep = synthesize_replay(model, bank, [2, 0, 1], config, sampling, selection, progress=False)
    assert x.shape == (6, 32, 8, 8) and y.tolist() == [2, 2, 0, 0, 1, 1] and t.shape == (6, 16)
    assert rep["classes"] == [2, 0, 1] and rep["num_processes"] == 1 and rep["targets"] == 6
    x2, _, t2, _ = synthesize_replay(model, bank, [2, 0, 1], config, sampling, selection, progress=False)
    assert torch.equal(x, x2) and torch.equal(t, t2)


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
    config = InversionConfig(batch_size=4, **FAST)
    sampling = SamplingConfig(per_class=2, selection="gaussian")
    # unshuffled, the 6 targets form batches [0:4] (rank 0) and [4:6] (rank 1, padded to 4 rows)
    rank1 = _TwoProcessAccelerator(1, peer=[torch.zeros(4, 32, 8, 8), torch.arange(4)])
    _, _, _, rep1 = synthesize_replay(model, bank, [0, 1, 2], config, sampling, shuffle=False, accelerator=rank1,
                                      progress=False)
    assert rep1["targets"] == 6 and rep1["num_processes"] == 2
    sent_x, sent_index = rank1.sent
    assert sent_x.shape == (4, 32, 8, 8) and sent_index.tolist() == [4, 5, -1, -1]
    assert torch.equal(sent_x[2:], torch.zeros(2, 32, 8, 8))  # the padding
    rank0 = _TwoProcessAccelerator(0, peer=[sent_x, sent_index])
    x, y, _, _ = synthesize_replay(model, bank, [0, 1, 2], config, sampling, shuffle=False, accelerator=rank0,
                                   progress=False)
    assert y.tolist() == [0, 0, 1, 1, 2, 2] and x.shape == (6, 32, 8, 8)
    assert torch.equal(x[4:6], sent_x[:2]) and rank0.sent[1].tolist() == [0, 1, 2, 3]


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


# ----- the reference's behaviours (shared/inversion-notes.md, table), each against its definition
def test_reference_preset_sets_every_reference_behaviour_and_keeps_explicit_values():
    from hf_pmi.inversion import REFERENCE_PRESET

    ref = InversionConfig(preset="reference")
    assert {k: getattr(ref, k) for k in REFERENCE_PRESET} == REFERENCE_PRESET
    ours = InversionConfig()
    assert all(getattr(ours, k) != v for k, v in REFERENCE_PRESET.items())  # each one is a real difference
    assert InversionConfig(preset="reference", refine_batch_size=40).refine_batch_size == 40
    with pytest.raises(ValueError, match="inversion_preset"):
        InversionConfig(preset="paper")


def test_an_unset_random_start_budget_is_one_per_layer_chunk(setup):
    model, stats = setup
    from hf_pmi.inversion import full_steps, passes_per_chunk

    config = InversionConfig(batch_size=4, **{**FAST, "full_steps": None})
    blocks = VisionBlocks(model)
    assert full_steps(blocks, config) == round(passes_per_chunk(blocks, config))
    rep = invert(model, torch.randn(4, 16), stats, config, mode="full", progress=False).report
    assert rep["steps"] == {"full": full_steps(blocks, config)}
    assert full_steps(blocks, InversionConfig(full_steps=9)) == 9  # an explicit value is kept


def test_layer_weight_is_alpha_rf_times_blocks_unless_given():
    assert InversionConfig().layer_weight(15) == pytest.approx(0.03)  # ViT-B/16: 0.002 x 15 blocks
    assert InversionConfig(alpha_rf=0.2).layer_weight(15) == pytest.approx(3.0)  # CUB
    assert InversionConfig(a_layer=0.5).layer_weight(15) == 0.5


def test_total_variation_norm_definition():
    x = torch.zeros(2, 3, 3, 3)
    x[0, 1, 1, 1] = 2.0  # one bright pixel in one of 6 (sample, channel) maps
    # per direction: the L2 norm over space of that map's differences, mean over the 6 maps
    right, diagonal = (2 * 2.0**2) ** 0.5 / 6, (2 * 2.0**2) ** 0.5 / 6
    assert total_variation(x, "norm").item() == pytest.approx(2 * right + 2 * diagonal)


def test_patch_channel_statistics_are_per_channel_moments(setup):
    model, _ = setup
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    stats = collect_layer_statistics(model, [pixels[:4], pixels[4:]])
    maps = VisionBlocks(model).patch_embed(pixels).detach()
    assert torch.allclose(stats.mean("patch_channel").float(), maps.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(stats.var("patch_channel").float(), maps.var(dim=(0, 2, 3), unbiased=False), atol=1e-4)


def test_channel_statistics_start_and_kl_on_the_coarse_variable(setup):
    model, stats = setup
    blocks = VisionBlocks(model)
    obj = Objective(blocks, stats, InversionConfig(patch_stats="channel"), torch.device("cpu"), torch.float32)
    x = obj.sample_input(1, 400, torch.Generator().manual_seed(0), size=2)
    m, v = obj.moments("patch_channel")
    assert x.shape == (400, 32, 2, 2)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), m, atol=0.3) and torch.allclose(x.var(dim=(0, 2, 3)), v, rtol=0.2)
    target = torch.randn(400, 65, 32)
    from torch.nn import functional as F

    up = F.interpolate(x, size=(8, 8), mode="bicubic", align_corners=False)
    loss = obj.block_loss(1, up, target, coarse=x)
    with torch.no_grad():
        tokens = up.flatten(2).transpose(1, 2)
        cls = blocks.embeddings.class_embedding.expand(400, 1, -1)
        pre_in = torch.cat([cls, tokens], 1) + blocks.embeddings.position_embedding.weight[None]
    expected = F.mse_loss(blocks.block(1, up), target) + obj.a_layer * (obj.kl("pre_ln_input", pre_in) + obj.kl("patch_channel", x))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    no_pre = Objective(blocks, stats, InversionConfig(patch_stats="channel", pre_block_kl=False), torch.device("cpu"), torch.float32)
    assert no_pre.hooked(1) == []
    assert no_pre.block_loss(1, up, target, coarse=x).item() == pytest.approx(
        (F.mse_loss(blocks.block(1, up), target) + obj.a_layer * obj.kl("patch_channel", x)).item(), rel=1e-5)


def test_last_layer_matches_all_tokens_or_cls_only(setup):
    model, stats = setup
    blocks = VisionBlocks(model)
    z, target = torch.randn(3, 65, 32), torch.randn(3, 65, 32)
    out = blocks.block(3, z)
    for cls_only, mse in ((True, F_mse(out[:, 0], target[:, 0])), (False, F_mse(out, target))):
        obj = Objective(blocks, stats, InversionConfig(cls_target_last_layer=cls_only, a_layer=0.0), torch.device("cpu"), torch.float32)
        assert obj.block_loss(3, z, target).item() == pytest.approx(mse.item(), rel=1e-5)


def F_mse(a, b):
    return torch.nn.functional.mse_loss(a, b)


def test_keep_best_returns_the_best_or_the_last_iterate():
    """A quadratic with a too-large lr overshoots, so the best iterate is not the last one."""
    objective = lambda v: (v**2).sum()  # noqa: E731
    z0 = torch.tensor([1.0])
    manual, visited = z0.clone().requires_grad_(True), []
    opt = torch.optim.Adam([manual], lr=2.0)
    for _ in range(5):
        visited.append((objective(manual).item(), manual.detach().clone()))
        opt.zero_grad()
        objective(manual).backward()
        opt.step()
    best, best_loss = adam_loop(objective, z0, 5, 2.0, Tracker(5, False, ""), "s", 0.0, True)
    last, last_loss = adam_loop(objective, z0, 5, 2.0, Tracker(5, False, ""), "s", 0.0, False)
    expected_loss, expected = min(visited, key=lambda lv: lv[0])
    assert best_loss == pytest.approx(expected_loss) and torch.equal(best, expected)
    assert torch.allclose(last, manual.detach()) and last_loss == pytest.approx(objective(manual).item())
    assert last_loss > best_loss


def test_refinement_in_chunks_and_cosine_period(setup):
    model, stats = setup
    costs = VisionBlocks(model).block_costs()
    config = InversionConfig(batch_size=4, refine_batch_size=2, refine_t_max=1000, **FAST)
    rep = invert(model, torch.randn(4, 16), stats, config, progress=False).report
    assert rep["steps"]["refine"] == 2 * 5 and rep["stage_passes"]["refine"] == pytest.approx(2 * 5 * sum(costs[1:]))
    assert len(rep["curve"]) == 5 and rep["curve"][-1][0] == pytest.approx(rep["full_model_passes"])
    assert "start_loss" in rep
    # T_max 2000 over 600 steps: the reference's lr ends at 0.5 (1 + cos(pi * 600 / 2000)) = 0.79 of its start
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2000)
    for _ in range(600):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 600 / 2000)))


def test_reference_pixel_path_gives_patch_maps_of_valid_pixels(setup):
    from hf_pmi.visualize import patch_maps_to_pixels

    model = build_clip("mini")  # an injective patch embedding, so patch maps map back to pixels
    stats = collect_layer_statistics(model, [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))])
    config = InversionConfig(preset="reference", batch_size=4, full_steps=40, first_block_steps=40, upsample_at=(10, 20))
    rep = invert(model, 10 * torch.randn(4, 64), stats, config, mode="full", progress=False)  # far targets: large steps
    assert rep.samples.shape == (4, 128, 8, 8) and rep.report["steps"] == {"full": 40}
    pixels = patch_maps_to_pixels(model, rep.samples)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    unit = pixels * std + mean  # back to [0, 1]: the coarse variable was clamped after every step
    # 40 steps of lr 0.1 could move a pixel by 4; bicubic up-sampling of a map in [0, 1] overshoots a little
    assert unit.min() > -0.3 and unit.max() < 1.3, (unit.min(), unit.max())


def test_reference_preset_inverts_end_to_end(setup):
    model, stats = setup
    config = InversionConfig(preset="reference", batch_size=4, **FAST)
    rep = invert(model, torch.randn(4, 16), stats, config, progress=False)
    assert rep.samples.shape == (4, 32, 8, 8)
    assert rep.report["steps"]["refine"] == 5  # chunks of 20 (one chunk of 4 here)
    assert math.isfinite(rep.report["final_loss"])


def test_block_variance_diagnostic_compares_solved_and_real_inputs(setup):
    model, stats = setup
    rep = invert(model, torch.randn(4, 16), stats, InversionConfig(batch_size=4, **FAST), progress=False).report
    blocks = VisionBlocks(model)
    assert set(rep["block_variance"]) == {f"block{i}" for i in range(1, blocks.num_blocks)}
    assert rep["block_variance"]["block2"]["real"] == pytest.approx(stats.var("layer0.input").mean().item())
    assert rep["block_variance"]["block1"]["real"] == pytest.approx(stats.var("patch").mean().item())
    assert all(v["solved"] > 0 for v in rep["block_variance"].values())
