"""The built-in quality estimator: monotone in resolution, calibrated, size-independent."""

import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.data import degrade, synthetic
from facemoe_jax.models import quality


def faces(n=40, size=48):
    return np.stack([synthetic.render_identity_image(3_000_000 + i, 0, size, 0) for i in range(n)])


def score(images):
    return np.asarray(quality.sharpness_score(jnp.asarray(images, jnp.float32) / 127.5 - 1.0))


def test_score_falls_with_resolution_and_matches_its_calibration():
    hr = faces()
    sizes = (6, 8, 12, 16, 24, 48)
    medians = [np.median(score(np.stack([degrade.to_resolution(f, px) for f in hr])))
               for px in sizes]  # fmt: skip
    # Non-decreasing (6 and 8 px are both at the floor), rising from 8 px on.
    assert np.all(np.diff(medians) >= 0) and medians[1] < medians[2] < medians[3] < medians[-1]
    rng = np.random.default_rng(0)
    captured = np.stack([degrade.acquisition_low_resolution(f, rng) for f in hr])
    # The constants: ~0 for a typical 8-16 px capture, ~1 for a full-resolution face.
    assert np.median(score(captured)) < 0.15 and np.median(score(hr)) > 0.85


def test_score_does_not_depend_much_on_the_input_size():
    small, large = score(faces(size=48)), score(faces(size=120))
    assert abs(np.median(small) - np.median(large)) < 0.2


def test_mix_value_follows_the_official_formula_and_sign():
    images = jnp.asarray(faces(4), jnp.float32) / 127.5 - 1.0
    s = score(faces(4))
    np.testing.assert_allclose(quality.quality_mix_value(images, threshold=0.3), 0.5 + s - 0.3,
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(quality.quality_mix_value(images, sign=-1.0), 0.5 - (s - 0.5),
                               rtol=1e-6)  # fmt: skip
    custom = quality.estimator("facemoe_jax.models.quality:sharpness_score")
    assert custom is quality.sharpness_score
    with pytest.raises(ValueError, match="config.model.lora.quality='brisque'"):
        quality.estimator("brisque")
