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
    flipped = [not np.array_equal(degrade.horizontal_flip(face, rng), face) for _ in range(400)]
    assert 0.42 < np.mean(flipped) < 0.58


def test_random_low_resolution_probability_zero_is_identity(face):
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = degrade.random_low_resolution(face, rng, p=0.0, min_ratio=0.2, max_ratio=1.0)
        assert out is face


def test_random_low_resolution_applied_degrades_and_is_reproducible(face):
    kwargs = {"p": 1.0, "min_ratio": 0.2, "max_ratio": 0.25}
    out = degrade.random_low_resolution(face, np.random.default_rng(3), **kwargs)
    again = degrade.random_low_resolution(face, np.random.default_rng(3), **kwargs)
    np.testing.assert_array_equal(out, again)
    assert out.shape == face.shape and out.dtype == np.uint8
    assert _high_frequency_energy(out) < 0.5 * _high_frequency_energy(face)


def test_random_low_resolution_application_rate():
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    rng = np.random.default_rng(2)
    applied = [
        degrade.random_low_resolution(image, rng, p=0.2, min_ratio=0.2, max_ratio=0.5) is not image
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


# ---- Degradations beyond the official low-resolution one.


def _always(fn, image, seed=0, **kwargs):
    return fn(image, np.random.default_rng(seed), p=1.0, **kwargs)


@pytest.mark.parametrize(
    "fn, kwargs",
    [
        (degrade.crop_with_zero_pad, {}),
        (degrade.photometric_jitter, {}),
        (degrade.gaussian_blur, {}),
        (degrade.motion_blur, {}),
        (degrade.sensor_noise, {}),
        (degrade.jpeg_recompress, {}),
        (degrade.grayscale, {}),
        (degrade.random_target_resolution, {"pixels": (8, 12)}),
    ],
)
def test_each_degradation_keeps_shape_dtype_is_seeded_and_skips_at_p0(face, fn, kwargs):
    out = _always(fn, face, **kwargs)
    assert out.shape == face.shape and out.dtype == np.uint8
    assert not np.array_equal(out, face)
    np.testing.assert_array_equal(out, _always(fn, face, **kwargs))  # same seed, same bytes
    assert fn(face, np.random.default_rng(0), p=0.0, **kwargs) is face


def test_low_resolution_effective_resolution_falls_with_the_ratio(face):
    energies = []
    for ratio in (1.0, 0.5, 0.25, 0.125):
        outs = [
            degrade.random_low_resolution(
                face, np.random.default_rng(s), p=1.0, min_ratio=ratio, max_ratio=ratio
            )
            for s in range(20)  # averaged over the five interpolations' draws
        ]
        energies.append(np.mean([_high_frequency_energy(o) for o in outs]))
    # Nearest-neighbour blocks keep some edge energy, so the fall is steady, not total.
    assert energies == sorted(energies, reverse=True) and energies[-1] < 0.3 * energies[0]


def test_crop_with_zero_pad_keeps_a_box_in_place_and_blacks_out_the_rest(face):
    image = np.maximum(face, 1)  # no black pixel in the input
    for seed in range(20):
        out = _always(degrade.crop_with_zero_pad, image, seed)
        kept = out.any(-1)
        rows, cols = np.nonzero(kept)
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        assert kept[box].all() and kept.sum() == kept[box].size  # one axis-aligned box
        np.testing.assert_array_equal(out[box], image[box])  # pasted back where it was
        share = kept.mean()
        assert 0.2 * 0.8 < share <= 1.0  # scale 0.2..1 of the area (rounding of the sides)


def test_photometric_jitter_matches_the_blend_formulas():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rng = np.random.default_rng(7)
    out = degrade.photometric_jitter(image, rng, p=1.0)
    # Replay the draws: apply flag, three factors, then the order.
    replay = np.random.default_rng(7)
    replay.random()
    factors = [replay.uniform(0.5, 1.5) for _ in range(3)]
    order = replay.permutation(3)
    x = image.astype(np.float64)
    for op in order:
        f = factors[op]
        gray = x @ np.array([0.299, 0.587, 0.114])
        ref = [0.0, np.rint(gray.mean()), gray[..., None]][op]
        x = np.clip(np.rint(f * x + (1 - f) * ref), 0, 255)
    assert np.abs(out.astype(int) - x.astype(int)).max() <= 1  # float32 vs float64 rounding


def test_grayscale_channels_are_equal_luma(face):
    out = _always(degrade.grayscale, face)
    luma = face.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0] - luma).max() <= 0.51


def test_blurs_remove_detail_and_motion_kernel_is_a_normalised_line(face):
    for fn in (degrade.gaussian_blur, degrade.motion_blur):
        assert _high_frequency_energy(_always(fn, face)) < 0.7 * _high_frequency_energy(face)
    kernel = degrade.motion_kernel(7, 0.0)
    np.testing.assert_allclose(kernel.sum(), 1.0, rtol=1e-6)
    assert kernel[3].sum() == pytest.approx(1.0) and np.count_nonzero(kernel) == 7  # horizontal


def test_sensor_noise_has_the_drawn_sigma():
    image = np.full((64, 64, 3), 128, np.uint8)
    out = degrade.sensor_noise(image, np.random.default_rng(1), p=1.0, max_sigma=6.0)
    replay = np.random.default_rng(1)
    replay.random()
    sigma = replay.uniform(1.0, 6.0)
    assert (out.astype(float) - 128).std() == pytest.approx(sigma, rel=0.05)


def test_jpeg_quality_controls_the_error(face):
    def error(quality):
        out = _always(degrade.jpeg_recompress, face, min_quality=quality, max_quality=quality)
        return np.abs(out.astype(float) - face).mean()

    assert error(5) > error(50) > error(95)


def test_acquisition_is_a_small_capture_resized_back(face):
    """Without blur, noise and JPEG loss it is the clean P-pixel resize; with them it differs."""
    clean = degrade.acquisition_low_resolution(
        face,
        np.random.default_rng(0),
        min_pixels=10,
        max_pixels=10,
        max_blur=0.0,
        max_noise_sigma=0.0,
        jpeg_quality=(100, 100),
    )
    assert clean.shape == face.shape and clean.dtype == np.uint8
    reference = degrade.to_resolution(face, 10)
    # JPEG at quality 100 keeps luma nearly exactly (its 4:2:0 chroma subsampling does not).
    luma = np.array([0.299, 0.587, 0.114])
    assert np.abs((clean.astype(float) - reference) @ luma).mean() < 1.5
    settings = dict(
        min_pixels=8, max_pixels=16, max_blur=0.5, max_noise_sigma=6.0, jpeg_quality=(30, 80)
    )
    a = degrade.acquisition_low_resolution(face, np.random.default_rng(5), **settings)
    b = degrade.acquisition_low_resolution(face, np.random.default_rng(5), **settings)
    np.testing.assert_array_equal(a, b)  # a pure function of the generator
    assert _high_frequency_energy(a) < 0.5 * _high_frequency_energy(face)
    c = degrade.acquisition_low_resolution(face, np.random.default_rng(6), **settings)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("acquisition_min_pixels", 20, r"acquisition_min_pixels \(20\) <= .*max_pixels \(16\)"),
        ("acquisition_jpeg_quality", "80", "acquisition_jpeg_quality='80' is not 'MIN,MAX'"),
        ("acquisition_jpeg_quality", "0,50", "1 <= MIN <= MAX <= 100"),
        ("acquisition_noise_sigma", -1.0, "acquisition_noise_sigma=-1.0 must be >= 0"),
    ],
)
def test_acquisition_settings_name_the_field(field, value, message):
    from configs import common

    data = common.get_base_config().data
    data[field] = value
    with pytest.raises(ValueError, match=message):
        degrade.acquisition_settings(data)
