"""BNBlocks (the chain view of a BN classifier) and the block statistics, for both supported families."""

import pytest
import torch
from torch import nn

from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
from hf_pmi.resnet.blocks import BNBlocks
from hf_pmi.resnet.statistics import bn_kl, channel_moments, collect_block_statistics


def tiny(n=1, size=16):
    torch.manual_seed(0)
    model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=n, base_width=4, num_labels=3, image_size=size))
    model.train()
    with torch.no_grad():
        model(pixel_values=torch.randn(16, 3, size, size))  # non-trivial running moments
    return model.eval()


def hf_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], num_labels=3, layer_type="basic")
    return ResNetForImageClassification(config).eval()


@pytest.mark.parametrize("make,size", [(tiny, 16), (hf_resnet, 32)])
def test_the_chain_reproduces_the_model(make, size):
    model = make()
    blocks = BNBlocks(model, image_size=size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        assert torch.allclose(blocks.forward_from(0, x), logits, atol=1e-6)
        for i in range(blocks.num_blocks - 1):  # cut anywhere, continue from there
            h = blocks.forward_from(0, x, end=i)
            assert torch.allclose(blocks.forward_from(i, h), logits, atol=1e-6)
            assert tuple(h.shape[1:]) == blocks.input_shape(i)
    bn_total = sum(len(blocks.bn_layers(i)) for i in range(blocks.num_blocks))
    assert bn_total == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert blocks.bn_layers(blocks.num_blocks - 1) == []  # the head has none


def test_transformers_resnet_block_split():
    blocks = BNBlocks(hf_resnet(), image_size=32)
    assert blocks.family == "resnet" and blocks.num_blocks == 1 + 3 + 1  # embedder, 3 basic layers, head
    assert blocks.input_shape(1) == (8, 8, 8)  # 7x7 stride-2 conv and max-pooling: 32 -> 8
    assert blocks.stage_groups() == [(0, 1), (1, 3), (3, 4)]  # depths [2, 1]


def test_block_costs_follow_multiply_adds():
    blocks = BNBlocks(tiny(n=2, size=16))
    costs = blocks.block_costs()
    assert abs(sum(costs) - 1) < 1e-9 and len(costs) == blocks.num_blocks
    # stage 1 (16x16, 4 ch): two identical blocks; a downsampling block (8x8, 4->8 then 8->8) costs 3/4 of one
    assert costs[1] == pytest.approx(costs[2])
    assert costs[3] == pytest.approx(0.75 * costs[1])
    assert costs[4] == pytest.approx(costs[1])  # 8x8 at 8 channels: same multiply-adds as 16x16 at 4
    assert costs[-1] < 0.01  # the head
    assert costs[0] == pytest.approx(3 / 4 / 2 * costs[1])  # stem: one 3->4 conv against two 4->4 convs


def test_input_prior_is_the_last_bn_of_the_block_below():
    model = tiny()
    with torch.no_grad():
        model.resnet.stages[0][0].bn_b.weight.fill_(0.5)
        model.resnet.stages[0][0].bn_b.bias.fill_(0.25)
    blocks = BNBlocks(model)
    mean, var = blocks.input_prior(2)
    assert torch.equal(mean, torch.full((4,), 0.25)) and torch.equal(var, torch.full((4,), 0.25))
    assert blocks.input_prior(0) is None
    assert torch.equal(blocks.input_prior(1)[0], model.resnet.stem.bn.bias)


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="ResNet32ForImageClassification or transformers' ResNetForImageClassification"):
        BNBlocks(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_block_statistics_are_the_moments_of_real_block_inputs():
    model = tiny()
    blocks = BNBlocks(model)
    x, y = torch.randn(10, 3, 16, 16), torch.tensor([0, 1] * 5)
    stats, feats = collect_block_statistics(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    with torch.no_grad():
        h = blocks.forward_from(0, x, end=2)
        mean, var = channel_moments(h)
        pooled = model(pixel_values=x).pooler_output
    assert torch.allclose(stats.mean("block2.input").float(), mean, atol=1e-5)
    assert torch.allclose(stats.var("block2.input").float(), var, atol=1e-5)
    assert stats.count("block2.input") == 10 and "block0.input" not in stats
    assert torch.allclose(feats[1], pooled[y == 1], atol=1e-6)
    assert model.training is False


def test_bn_kl_is_zero_at_the_running_moments_and_grows_away_from_them():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(2.0)
    bn.running_var.fill_(4.0)
    matched = 2.0 + 2.0 * torch.randn(20000, 3, 1, 1)
    assert float(bn_kl(matched, bn)) < 1e-3
    assert float(bn_kl(torch.randn(20000, 3, 1, 1), bn)) > 0.3
