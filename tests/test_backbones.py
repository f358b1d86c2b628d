"""The demos' backbones ship with hf_pmi: they load without pre-training, verified against their recorded
sha256 (a changed file is an error naming the fix); other configurations are still pre-trained, and the
export command that made the shipped files works."""

import json
import os
import shutil
import time

import pytest

from hf_pmi.testing import cache
from hf_pmi.testing.backbones import EXPORTS, letters_clip, shapes_clip


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_the_shipped_backbones_load_verified_and_without_pre_training(kind, tmp_path):
    spec = EXPORTS[kind]()
    key = os.path.basename(cache.cache_folder(spec["name"], **{k: v for k, v in spec.items()
                                                                if k not in ("name", "train", "description")}))
    entry = cache.shipped_manifest()[key]
    assert entry["command"] == f"python -m hf_pmi.testing.backbones --export {kind}"
    weights = os.path.join(cache.SHIPPED_DIR, key, cache.WEIGHTS)
    assert os.path.getsize(weights) == entry["bytes"] < 8_000_000  # the repository stays small
    start = time.monotonic()
    clip = letters_clip("mini", cache_dir=str(tmp_path)) if kind == "letters" else shapes_clip(str(tmp_path))
    assert time.monotonic() - start < 30  # loaded, not pre-trained (minutes)
    assert not list(tmp_path.iterdir())  # nothing trained into the cache
    assert clip.config._name_or_path == "" and not clip.training


def test_a_changed_shipped_file_is_an_error_naming_the_fix(tmp_path, monkeypatch):
    shipped = tmp_path / "pretrained"
    shutil.copytree(cache.SHIPPED_DIR, shipped)
    monkeypatch.setattr(cache, "SHIPPED_DIR", str(shipped))
    key = next(k for k in cache.shipped_manifest() if k.startswith("letters-clip-mini"))
    weights = shipped / key / cache.WEIGHTS
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")  # an LFS pointer
    with pytest.raises(cache.ShippedBackboneError, match=r"is not the shipped backbone.*git checkout.*--export letters"):
        letters_clip("mini", cache_dir=str(tmp_path / "cache"))


def test_export_trains_afresh_and_ships_with_its_checksum_then_loads(tmp_path, monkeypatch):
    """The export command's function on a tiny configuration: it pre-trains (the script stays tested), ships
    the weights with their sha256 and the command, and the loader then uses them instead of training."""
    monkeypatch.setattr(cache, "SHIPPED_DIR", str(tmp_path / "pretrained"))
    os.makedirs(cache.SHIPPED_DIR)
    kwargs = dict(size="tiny", seed=0, epochs=0.2, per_class=4, image_size=32)
    entry = cache.export_pretrained("letters-clip-tiny", "hf_pmi.testing.backbones:pretrain_letters_clip",
                                    "tiny letters CLIP", "python -m hf_pmi.testing.backbones --export tiny", **kwargs)
    manifest = json.loads((tmp_path / "pretrained" / cache.SHIPPED_MANIFEST).read_text())
    (key,) = manifest
    assert manifest[key] == entry and entry["arguments"] == kwargs
    assert entry["sha256"] == cache.sha256_file(str(tmp_path / "pretrained" / key / cache.WEIGHTS))
    clip = letters_clip(cache_dir=str(tmp_path / "cache"), **kwargs)
    assert not (tmp_path / "cache").exists()  # the shipped copy, not a new pre-training
    assert clip.config.vision_config.hidden_size == 32
