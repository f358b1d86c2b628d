"""invert_bn: the per-layer chain and the random start on BN statistics, their pass accounting and report."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
from hf_pmi.resnet.blocks import BNBlocks
from hf_pmi.resnet.inversion import BNInversionConfig, invert_bn
from hf_pmi.resnet.statistics import collect_block_statistics


@pytest.fixture(scope="module")
def trained():
    """A tiny ResNet whose BN running moments are those of its 'real' data, and features of that data."""
    torch.manual_seed(0)
    # zero_residual=False: at the zero-residual init every block's last BN has gamma 0, so the reference's input
    # prior (variance gamma^2) would be degenerate; a trained model has gamma != 0
    config = ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=2, image_size=8, zero_residual=False)
    model = ResNet32ForImageClassification(config)
    x = 0.5 * torch.randn(64, 3, 8, 8) + torch.linspace(-1, 1, 8).view(1, 1, 1, 8)  # images with structure
    model.train()
    with torch.no_grad():
        for _ in range(20):  # running moments converge to this data's
            model(pixel_values=x)
    model.eval()
    with torch.no_grad():
        feats = model(pixel_values=x).pooler_output
    return model, x, feats


def small(**kw):
    return BNInversionConfig(**{"layer_steps": 15, "refine_steps": 30, **kw})


def test_pmi_inverts_features_and_reports_every_block(trained):
    model, x, feats = trained
    targets = feats[:16]
    # a_layer 1: this untrained model's features are small (mean square ~0.3), so the reference's 0.25 x 4 x 20 = 20
    # would let the statistics terms win over the feature match
    result = invert_bn(model, targets, small(a_layer=1.0))
    report = result.report
    blocks = BNBlocks(model)
    with torch.no_grad():
        noise_mse = F.mse_loss(blocks.features_from(0, torch.randn(16, 3, 8, 8)), targets).item()
    assert result.samples.shape == (16, 3, 8, 8)
    assert report["final_feature_mse"] < 0.2 * noise_mse
    assert report["final_loss"] <= report["start_loss"]
    assert sorted(report["block_loss"]) == [f"block{i}" for i in range(blocks.feature_block + 1)]
    top = report["block_loss"][f"block{blocks.feature_block}"]
    assert top["mse"] < 0.5 * noise_mse  # the top block alone gets close to its target
    assert set(report["block_variance"]["block1"]) == {"solved_variance", "prior_variance", "real_variance"}
    assert report["block_variance"]["block0"]["prior_variance"] is None  # pixels have no prior
    assert len(report["curve"]) == 30 and report["curve"][-1][0] == pytest.approx(report["full_model_passes"])


def test_pass_accounting_and_the_equal_budget_of_the_random_start(trained):
    model, _, feats = trained
    costs = BNBlocks(model).block_costs()
    chain = sum(costs[:-1])
    pmi = invert_bn(model, feats[:8], small()).report
    assert pmi["stage_passes"]["block2"] == pytest.approx(15 * costs[2])
    assert pmi["full_model_passes"] == pytest.approx((15 + 30) * chain)  # the chain costs layer_steps passes in all
    full = invert_bn(model, feats[:8], small(mode="full")).report
    assert full["steps"] == {"full": 45} and full["full_model_passes"] == pytest.approx(pmi["full_model_passes"])
    assert "start_loss" not in full and full["block_loss"] == {}


def test_chunks_follow_layer_and_refine_batches(trained):
    model, _, feats = trained
    report = invert_bn(model, feats[:12], small(layer_batch=6, refine_batch=3, layer_steps=2, refine_steps=3)).report
    assert report["num_chunks"] == 4 and report["steps"]["block0"] == 4 and report["steps"]["refine"] == 12
    # the curve brings every chunk to step j: at the last step all passes are spent
    assert report["curve"][-1][0] == pytest.approx(report["full_model_passes"])
    full = BNInversionConfig(layer_batch=6, refine_batch=3, layer_steps=2, refine_steps=3)
    assert full.full_budget_steps(chunks=2, refine_chunks=4) == 4  # 3 + 2 x 2 / 4 (rounded)


def test_recorded_prior_uses_real_block_moments(trained):
    model, x, feats = trained
    stats, _ = collect_block_statistics(model, [(x, torch.zeros(64, dtype=torch.long))])
    report = invert_bn(model, feats[:16], small(input_prior="recorded"), input_stats=stats).report
    var = report["block_variance"]["block2"]
    assert var["prior_variance"] == pytest.approx(var["real_variance"], rel=1e-5)
    with pytest.raises(ValueError, match="collect_block_statistics"):
        invert_bn(model, feats[:4], small(input_prior="recorded"))


def test_deterministic_and_leaves_the_model_as_it_was(trained):
    model, _, feats = trained
    model.train()
    model.classifier.requires_grad_(False)
    try:
        a = invert_bn(model, feats[:4], small(layer_steps=2, refine_steps=2)).samples
        b = invert_bn(model, feats[:4], small(layer_steps=2, refine_steps=2)).samples
        assert torch.equal(a, b)
        assert model.training and not model.classifier.weight.requires_grad
        assert model.resnet.stem.conv.weight.requires_grad and model.resnet.stem.conv.weight.grad is None
    finally:
        model.eval()
        model.classifier.requires_grad_(True)


def test_bad_settings_are_refused(trained):
    model, _, feats = trained
    with pytest.raises(ValueError, match=r"\(B, 16\) pooled features"):
        invert_bn(model, feats[:, :8], small())
    with pytest.raises(ValueError, match="mode"):
        BNInversionConfig(mode="generator")
    with pytest.raises(ValueError, match="batch"):
        BNInversionConfig(layer_batch=1)
    assert math.isclose(BNInversionConfig(a_layer=3.0).layer_weight(16), 3.0)


def test_stage_chain_has_one_link_per_stage_and_the_same_budget(trained):
    model, _, feats = trained
    blocks = BNBlocks(model)
    assert blocks.stage_groups() == [(0, 1), (1, 2), (2, 3), (3, 4)]  # one block per stage in this tiny model
    report = invert_bn(model, feats[:8], small(chain="stages")).report
    assert report["full_model_passes"] == pytest.approx(invert_bn(model, feats[:8], small()).report["full_model_passes"])
    with pytest.raises(ValueError, match="chain"):
        BNInversionConfig(chain="layers")
