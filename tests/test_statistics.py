"""LayerStatistics, token moments, the KL formula and hook hygiene, checked against definitions."""

import pytest
import torch

from hf_pmi.blocks import VisionBlocks
from hf_pmi.statistics import LayerStatistics, collect_layer_statistics, kl_moments, token_moments
from hf_pmi.testing import build_clip


def test_kl_matches_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(7, generator=g), torch.randn(7, generator=g)
    v1, v2 = torch.rand(7, generator=g) + 0.1, torch.rand(7, generator=g) + 0.1
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1.double(), v1.double().sqrt()), torch.distributions.Normal(m2.double(), v2.double().sqrt())
    ).mean()
    assert torch.allclose(kl_moments(m1, v1, m2, v2).double(), ref, atol=1e-6)
    # closed form by hand for one position: 0.5 * (log(v2/v1) - 1 + (v1 + d^2) / v2)
    hand = 0.5 * (torch.log(torch.tensor(4.0)) - 1 + (1 + 9) / 4)
    assert torch.allclose(kl_moments(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([4.0])), hand)
    assert kl_moments(m1, v1, m1, v1).abs() < 1e-6


def test_token_moments_definition():
    x = torch.randn(3, 5, 4)
    m, v = token_moments(x)
    for n in range(5):
        vals = x[:, n, :].flatten()
        assert torch.allclose(m[n], vals.mean(), atol=1e-6)
        assert torch.allclose(v[n], vals.var(unbiased=False), atol=1e-6)
    patch = torch.randn(2, 6, 3, 3)  # (B, D, g, g): a position's moments over batch and channels
    m, v = token_moments(patch)
    assert m.shape == (9,)
    assert torch.allclose(m[4], patch[:, :, 1, 1].mean(), atol=1e-6)
    assert torch.allclose(v[4], patch[:, :, 1, 1].var(unbiased=False), atol=1e-6)


def test_merge_by_counts_equals_moments_of_concatenation():
    a, b = torch.randn(3, 5, 4) * 2 + 1, torch.randn(7, 5, 4) - 0.5
    sa, sb = LayerStatistics(), LayerStatistics()
    sa.update("k", a)
    sb.update("k", b)
    merged = sa.merge(sb)
    m, v = token_moments(torch.cat([a, b]).double())
    assert merged.count("k") == 10
    assert torch.allclose(merged.mean("k"), m, atol=1e-12)
    assert torch.allclose(merged.var("k"), v, atol=1e-10)
    assert sa.count("k") == 3  # merge does not modify its operands


def test_round_trip_and_collect_keys():
    model = build_clip("tiny")
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(4, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)]
    stats = collect_layer_statistics(model, pixels)
    expected = {"patch", "patch_channel", "pre_ln_input", "post_input"} | {f"layer{k}.{h}" for k in range(2) for h in ("input", "ln1", "ln2")}
    assert set(stats.keys()) == expected
    assert stats.mean("patch").shape == (64,) and stats.var("layer1.ln2").shape == (65,)
    # the layer-0 input is the pre-layernorm output: check against a direct computation
    blocks = VisionBlocks(model)
    with torch.no_grad():
        z = blocks.pre(blocks.patch_embed(torch.cat(pixels)))
    m, v = token_moments(z.double())
    assert torch.allclose(stats.mean("layer0.input"), m, atol=1e-5)
    assert torch.allclose(stats.var("layer0.input"), v, atol=1e-5)
    again = LayerStatistics.from_tensors(stats.to_tensors())
    for key in stats.keys():
        assert torch.equal(again.mean(key), stats.mean(key)) and again.count(key) == 6


def _num_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_mode_restored_even_on_error():
    model = build_clip("tiny").train()
    collect_layer_statistics(model, [torch.randn(2, 3, 32, 32)])
    assert _num_hooks(model) == 0
    assert model.training

    def batches():
        yield torch.randn(2, 3, 32, 32)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        collect_layer_statistics(model, batches())
    assert _num_hooks(model) == 0
    assert model.training and model.vision_model.encoder.layers[0].training
