"""Degradations: target resolution, flip, random low resolution."""

import cv2
import numpy as np
import pytest

from facemoe_jax.data import degrade, synthetic


@pytest.fixture(scope="module")
def face():
    return synthetic.render_identity_image(5, 0, 64, seed=0)


def _high_frequency_energy(image: np.ndarray) -> float:
    """Mean squared difference between the image and its 5x5 Gaussian blur (detail energy)."""
    grey = image.astype(np.float32).mean(-1)
    return float(((grey - cv2.GaussianBlur(grey, (5, 5), 1.5)) ** 2).mean())


def test_to_resolution_keeps_shape_and_dtype_and_8px_loses_detail(face):
    low = degrade.to_resolution(face, 8)
    assert low.shape == face.shape and low.dtype == np.uint8
    # Coarse content (mean colour) survives; detail energy falls by over an order of magnitude.
    assert np.abs(low.mean((0, 1)) - face.mean((0, 1))).max() < 6
    assert _high_frequency_energy(low) < 0.1 * _high_frequency_energy(face)
    # At its own size the round trip is the identity.
    np.testing.assert_array_equal(degrade.to_resolution(face, 64), face)


def test_to_resolution_rejects_less_than_one_pixel(face):
    with pytest.raises(ValueError, match="pixels must be >= 1"):
        degrade.to_resolution(face, 0)
    assert degrade.to_resolution(face, 1).std(axis=(0, 1)).max() == 0  # one colour


def test_horizontal_flip_probability_and_mirroring(face):
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(degrade.horizontal_flip(face, rng, p=1.0), face[:, ::-1])
    assert degrade.horizontal_flip(face, rng, p=0.0) is face
    flipped = [
        not np.array_equal(degrade.horizontal_flip(face, rng), face) for _ in range(400)
    ]
    assert 0.42 < np.mean(flipped) < 0.58


def test_random_low_resolution_probability_zero_is_identity(face):
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = degrade.random_low_resolution(face, rng, p=0.0, min_ratio=0.2, max_ratio=1.0)
        assert out is face


def test_random_low_resolution_applied_degrades_and_is_reproducible(face):
    kwargs = dict(p=1.0, min_ratio=0.2, max_ratio=0.25)
    out = degrade.random_low_resolution(face, np.random.default_rng(3), **kwargs)
    again = degrade.random_low_resolution(face, np.random.default_rng(3), **kwargs)
    np.testing.assert_array_equal(out, again)
    assert out.shape == face.shape and out.dtype == np.uint8
    assert _high_frequency_energy(out) < 0.5 * _high_frequency_energy(face)


def test_random_low_resolution_application_rate():
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    rng = np.random.default_rng(2)
    applied = [
        degrade.random_low_resolution(image, rng, p=0.2, min_ratio=0.2, max_ratio=0.5)
        is not image
        for _ in range(1000)
    ]
    assert 0.16 < np.mean(applied) < 0.24


def test_random_low_resolution_uses_all_five_interpolations(monkeypatch):
    used = []
    real_resize = cv2.resize

    def spy(image, size, interpolation):
        used.append(interpolation)
        return real_resize(image, size, interpolation=interpolation)

    monkeypatch.setattr(degrade.cv2, "resize", spy)
    image = np.zeros((16, 16, 3), np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(100):
        degrade.random_low_resolution(image, rng, p=1.0, min_ratio=0.5, max_ratio=0.5)
    assert set(used) == set(degrade.LOW_RESOLUTION_INTERPOLATIONS)


def test_random_low_resolution_rejects_bad_ratios(face):
    with pytest.raises(ValueError, match="min_ratio"):
        degrade.random_low_resolution(
            face, np.random.default_rng(0), p=1.0, min_ratio=0.5, max_ratio=0.2
        )
