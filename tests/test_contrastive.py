"""Contrastive model, CFS spread and moment compensation."""

import torch

from hf_pmi.contrastive import (
    ContrastiveModel,
    compensate_moments,
    contrastive_select,
    gaussian_sample,
    sample_class_features,
    train_contrastive,
    uniformity_loss,
)


def _class_features(n=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * (torch.rand(d, generator=g) + 0.5) + 2.0


def test_model_output_is_unit_norm_and_training_lowers_uniformity_loss():
    feats = _class_features()
    g0 = train_contrastive(feats, epochs=0)
    g = train_contrastive(feats, epochs=30)
    assert not g.training
    with torch.no_grad():
        z = g(feats)
        assert torch.allclose(z.norm(dim=1), torch.ones(len(feats)), atol=1e-5)
        assert uniformity_loss(z) < uniformity_loss(g0(feats)) - 0.05


def test_cfs_selects_a_more_spread_set_than_gaussian_samples():
    feats = _class_features()
    mean, std = feats.mean(0), feats.std(0, unbiased=False)
    g = train_contrastive(feats, epochs=5)  # a partly trained g: similarities well away from 0
    n = 100
    cfs_sim, gauss_sim = [], []
    for seed in range(3):
        # the selected set itself, before moment compensation (which rescales every feature)
        sel = contrastive_select(mean, std, g, n, generator=torch.Generator().manual_seed(seed), compensate=False)
        plain = gaussian_sample(mean, std, n, torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            for x, out in ((sel, cfs_sim), (plain, gauss_sim)):
                z = g(x)
                out.append(((z @ z.T).sum() - n) / (n * (n - 1)))  # mean off-diagonal g-similarity
    cfs_sim, gauss_sim = torch.stack(cfs_sim), torch.stack(gauss_sim)
    assert (cfs_sim < gauss_sim).all(), (cfs_sim, gauss_sim)
    assert cfs_sim.mean() < gauss_sim.mean() - 0.03, (cfs_sim, gauss_sim)


def test_moment_compensation_matches_class_moments():
    feats = _class_features()
    mean, std = feats.mean(0), feats.std(0, unbiased=False)
    g = train_contrastive(feats, epochs=5)
    exact = contrastive_select(mean, std, g, 100, generator=torch.Generator().manual_seed(0), exact_standardise=True)
    assert torch.allclose(exact.mean(0), mean, atol=1e-4)
    assert torch.allclose(exact.std(0, unbiased=False), std, atol=1e-4)
    # the reference formula (x + mu - m) * sigma / s: std exact, mean scaled by sigma / s
    x = torch.randn(50, 4) * 3 + 1
    mu, sigma = torch.tensor([0.5, 1.0, -2.0, 0.0]), torch.tensor([1.0, 2.0, 0.5, 1.0])
    ref = compensate_moments(x, mu, sigma)
    s = x.std(0, unbiased=False)
    assert torch.allclose(ref.std(0, unbiased=False), sigma, atol=1e-5)
    assert torch.allclose(ref.mean(0), mu * sigma / s, atol=1e-5)


def test_sample_class_features_shape_and_determinism():
    g = ContrastiveModel(8).eval()
    a = sample_class_features(torch.zeros(8), torch.ones(8), g, 5, generator=torch.Generator().manual_seed(3))
    b = sample_class_features(torch.zeros(8), torch.ones(8), g, 5, generator=torch.Generator().manual_seed(3))
    c = sample_class_features(torch.zeros(8), torch.ones(8), g, 5, generator=torch.Generator().manual_seed(4))
    assert a.shape == (5, 8) and torch.equal(a, b) and not torch.equal(a, c)
