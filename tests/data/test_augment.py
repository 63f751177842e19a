"""The config-built augmenter: step selection, stream compatibility, validation."""

import numpy as np
import pytest

from configs import demo
from facemoe_jax.data import augment, degrade


def data_config(**overrides):
    config = demo.get_config().data
    config.update(**overrides)
    return config


def test_flip_only_draws_exactly_what_the_flip_draws():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    augmenter = augment.Augmenter(data_config(flip_prob=0.5))
    for seed in range(20):
        want = degrade.horizontal_flip(image, np.random.default_rng(seed), p=0.5)
        np.testing.assert_array_equal(augmenter(image, np.random.default_rng(seed)), want)


def test_official_recipe_applies_each_step_at_its_rate():
    config = data_config()
    augment.official_augmentation(config)
    augmenter = augment.Augmenter(config)
    names = [fn.__name__ for fn, _ in augmenter.geometry_steps + augmenter.degrade_steps]
    assert names == [
        "crop_with_zero_pad",
        "horizontal_flip",
        "photometric_jitter",
        "random_low_resolution",
    ]
    image = np.full((16, 16, 3), 100, np.uint8)
    image[:, :8] = 200
    black = [(augmenter(image, np.random.default_rng(s)) == 0).all(-1).any() for s in range(600)]
    # p = 0.2, less the draws whose box covers the whole image (area share near 1).
    assert 0.10 < np.mean(black) <= 0.22


def test_bad_augmentation_settings_name_the_field():
    with pytest.raises(ValueError, match="config.data.noise_prob=1.5"):
        augment.Augmenter(data_config(noise_prob=1.5))
    with pytest.raises(ValueError, match="jpeg_min_quality"):
        augment.Augmenter(data_config(jpeg_min_quality=80, jpeg_max_quality=20))
    with pytest.raises(ValueError, match="target_resolutions='8,x'"):
        augment.Augmenter(data_config(target_res_prob=0.5, target_resolutions="8,x"))
