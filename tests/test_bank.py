"""FeatureBank: Gaussians, sampling, bit-exact save/load, refusal of pickles."""

import json

import pytest
import torch
from hub_server import hub_client, hub_server  # noqa: F401  (fixtures)

from hf_pmi.bank import CONFIG_NAME, WEIGHTS_NAME, FeatureBank, class_features
from hf_pmi.statistics import collect_layer_statistics
from hf_pmi.testing import build_clip


def _bank(covariance="diag"):
    g = torch.Generator().manual_seed(0)
    bank = FeatureBank(covariance=covariance, shrinkage=0.2)
    feats = {c: torch.randn(12, 6, generator=g) + c for c in range(3)}
    bank.add_classes([0, 1, 2], feats, contrastive_epochs=3)
    model = build_clip("tiny")
    bank.update_statistics(collect_layer_statistics(model, [torch.randn(3, 3, 32, 32, generator=g)]))
    bank.update_statistics(collect_layer_statistics(model, [torch.randn(5, 3, 32, 32, generator=g)]))
    return bank, feats


def test_gaussians_are_population_moments():
    bank, feats = _bank()
    assert bank.num_classes == 3 and bank.counts.tolist() == [12, 12, 12]
    assert torch.allclose(bank.means[1], feats[1].mean(0))
    assert torch.allclose(bank.stds[2], feats[2].std(0, unbiased=False))
    assert bank.statistics.count("patch") == 8  # merged across the two updates


def test_class_ids_must_continue_in_order():
    bank, _ = _bank()
    with pytest.raises(ValueError, match="next ids are \\[3\\]"):
        bank.add_classes([4], {4: torch.randn(5, 6)}, train_contrastive=False)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_round_trip_is_bit_exact(tmp_path, covariance):
    bank, _ = _bank(covariance)
    bank.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["covariance"] == covariance
    again = FeatureBank.from_pretrained(tmp_path)
    assert torch.equal(again.means, bank.means) and torch.equal(again.stds, bank.stds)
    assert torch.equal(again.counts, bank.counts)
    if covariance == "full":
        assert torch.equal(again.covariances, bank.covariances)
    assert again.contrastive.keys() == bank.contrastive.keys()
    for c in bank.contrastive:
        for k, v in bank.contrastive[c].items():
            assert torch.equal(again.contrastive[c][k], v), (c, k)
    assert set(again.statistics.keys()) == set(bank.statistics.keys())
    for key in bank.statistics.keys():
        assert torch.equal(again.statistics.mean(key), bank.statistics.mean(key))
        assert torch.equal(again.statistics.var(key), bank.statistics.var(key))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(bank.sample([0, 2], 4, g1)[0], again.sample([0, 2], 4, g2)[0])


def test_sample_shapes_labels_and_selection():
    bank, _ = _bank("full")
    x, y = bank.sample([2, 0], per_class=3, generator=torch.Generator().manual_seed(0), selection="gaussian")
    assert x.shape == (6, 6) and y.tolist() == [2, 2, 2, 0, 0, 0]
    x, y = bank.sample([1], per_class=4, generator=torch.Generator().manual_seed(0), selection="cfs")
    assert x.shape == (4, 6) and y.tolist() == [1] * 4
    with pytest.raises(ValueError, match="selection"):
        bank.sample([0], 2, selection="nearest")
    plain = FeatureBank()
    plain.add_classes([0], {0: torch.randn(4, 6)}, train_contrastive=False)
    with pytest.raises(ValueError, match="selection='gaussian'"):
        plain.sample([0], 2, selection="cfs")


def test_pickle_refused_in_a_directory(tmp_path):
    (tmp_path / "feature_bank.pt").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="Pickles are refused.*save_pretrained"):
        FeatureBank.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        FeatureBank.from_pretrained(tmp_path / "empty")


def test_bank_on_the_hub_loads_by_revision_and_a_pickle_is_refused(tmp_path, hub_client):
    """Over real HTTP (the local Hub server): a bank subfolder that offers only a pickle is refused, naming
    it; a safetensors bank on a branch loads bit-exactly from that branch."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("user/some-bank")
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "feature_bank.pkl").write_bytes(b"not really a pickle")
    api.upload_folder(folder_path=tmp_path / "pkl", path_in_repo="bank", repo_id="user/some-bank")
    with pytest.raises(ValueError, match="feature_bank.pkl"):
        FeatureBank.from_pretrained("user/some-bank", subfolder="bank")
    bank, _ = _bank()
    bank.save_pretrained(tmp_path / "good")
    api.create_branch("user/some-bank", branch="v1")
    api.upload_folder(folder_path=tmp_path / "good", path_in_repo="bank", repo_id="user/some-bank", revision="v1",
                      delete_patterns="*.pkl")
    loaded = FeatureBank.from_pretrained("user/some-bank", revision="v1", subfolder="bank")
    assert torch.equal(loaded.means, bank.means) and torch.equal(loaded.stds, bank.stds)


def test_class_features_group_by_label():
    model = build_clip("tiny")
    x = torch.randn(6, 3, 32, 32)
    feats = class_features(model, [(x[:3], torch.tensor([0, 1, 0])), (x[3:], torch.tensor([1, 1, 2]))])
    assert sorted(feats) == [0, 1, 2] and feats[1].shape == (3, 16)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=x).pooler_output
    assert torch.allclose(feats[0], ref[[0, 2]], atol=1e-5)
