"""The shapes world: classes, held-out pairs, the dataset, and the pre-training of its CLIP."""

import numpy as np

from hf_pmi.testing.backbones import shapes_clip, zero_shot_accuracy
from hf_pmi.testing.shapes import ALL_CLASSES, COLOUR_NAMES, HELD_OUT, SEEN, SHAPES, load_shapes_dataset, shapes_images


def test_held_out_pairs_cover_every_shape_and_colour_twice():
    assert len(ALL_CLASSES) == 64 and len(HELD_OUT) == 16 and not set(HELD_OUT) & set(SEEN)
    for word in SHAPES:
        assert sum(name.split(" ", 1)[1] == word for name in HELD_OUT) == 2
    for word in COLOUR_NAMES:
        assert sum(name.split(" ", 1)[0] == word for name in HELD_OUT) == 2


def test_images_show_the_colour_and_vary():
    x, y, sizes = shapes_images(["red circle", "blue circle"], per_class=6, seed=0)
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8 and set(sizes) <= {"small", "large"}
    brightest = x.reshape(12, -1, 3)[np.arange(12), x.reshape(12, -1, 3).sum(-1).argmax(1)]
    assert (brightest[y == 0, 0] > brightest[y == 0, 2]).all() and (brightest[y == 1, 2] > brightest[y == 1, 0]).all()
    assert len({a.tobytes() for a in x}) == 12


def test_dataset_class_names_are_clip_class_names():
    data = load_shapes_dataset(per_class=2, test_per_class=1)
    assert data["train"].features["label"].names == HELD_OUT
    assert len(data["train"]) == 32 and len(data["test"]) == 16


def test_pretraining_runs_caches_and_is_evaluated(tmp_path):
    clip = shapes_clip(cache_dir=str(tmp_path), steps=3)
    assert clip.config._name_or_path == "" and clip.text_model.config.num_hidden_layers == 4
    assert list(tmp_path.glob("shapes-clip-small-*/config.json"))
    acc = zero_shot_accuracy(clip, HELD_OUT[:4], per_class=3)
    assert 0.0 <= acc <= 1.0
