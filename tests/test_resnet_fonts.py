"""The fonts world: deterministic, varied, every face legible."""

import numpy as np
import pytest

from hf_pmi.testing.fonts import FACES, LETTERS, font_letters_images, load_font_letters_dataset, render_letter


def test_deterministic_per_seed():
    a, ya = font_letters_images(3, num_classes=4, image_size=16, seed=7)
    b, yb = font_letters_images(3, num_classes=4, image_size=16, seed=7)
    c, _ = font_letters_images(3, num_classes=4, image_size=16, seed=8)
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and not np.array_equal(a, c)
    assert ya.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("face", FACES)
def test_every_face_draws_a_visible_letter(face):
    rng = np.random.default_rng(0)
    for char in "aiLw":
        img = render_letter(char, face, 16, rng).astype(np.float32)
        # letter and background differ: the image is far from flat
        assert img.std() > 10, (face, char)


def test_styles_vary_within_a_class():
    images, _ = font_letters_images(20, num_classes=1, image_size=16, seed=0)
    backgrounds = images[:, 0, 0].astype(np.float32)  # corner pixels
    assert backgrounds.std(axis=0).mean() > 30  # colours change from image to image
    assert len({images[i].tobytes() for i in range(20)}) == 20


def test_dataset_and_bounds():
    data = load_font_letters_dataset(num_classes=3, image_size=16, train_per_class=2, test_per_class=1)
    assert data["train"].features["label"].names == list(LETTERS[:3])
    assert len(data["train"]) == 6 and len(data["test"]) == 3 and data["test"][0]["image"].size == (16, 16)
    with pytest.raises(ValueError, match="num_classes"):
        font_letters_images(1, num_classes=27)
    with pytest.raises(ValueError, match="face"):
        render_letter("a", "gothic", 16, np.random.default_rng(0))
