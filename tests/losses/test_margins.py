"""Margin logits and cross-entropy against hand-computed numbers and NumPy re-implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.losses.margins import (
    ADAFACE_INITIAL_MEAN,
    ADAFACE_INITIAL_STD,
    adaface_logits,
    adaface_update_stats,
    combined_margin_logits,
    softmax_cross_entropy,
)

# Row 0 targets column 1 (cos 0.5), row 1 targets column 0 (cos 0.8), row 2 has no target.
COSINES = np.array([[0.1, 0.5, -0.3], [0.8, 0.2, 0.0], [0.6, -0.9, 0.4]], dtype=np.float32)
LABELS = np.array([1, 0, -1], dtype=np.int32)


def _target_values(logits):
    return float(logits[0, 1]), float(logits[1, 0])


def test_cosface_target_is_plain_subtraction():
    logits = np.asarray(combined_margin_logits(COSINES, LABELS, scale=64.0, m3=0.4))
    assert logits.dtype == np.float32
    np.testing.assert_allclose(_target_values(logits), (64 * 0.1, 64 * 0.4), rtol=1e-6)


def test_arcface_target_logits():
    logits = np.asarray(combined_margin_logits(COSINES, LABELS, scale=64.0, m2=0.5))
    expected = (64 * math.cos(math.acos(0.5) + 0.5), 64 * math.cos(math.acos(0.8) + 0.5))
    np.testing.assert_allclose(_target_values(logits), expected, rtol=1e-5)


def test_sphereface_target_logits():
    logits = np.asarray(combined_margin_logits(COSINES, LABELS, scale=30.0, m1=1.35))
    expected = (30 * math.cos(1.35 * math.acos(0.5)), 30 * math.cos(1.35 * math.acos(0.8)))
    np.testing.assert_allclose(_target_values(logits), expected, rtol=1e-5)


def test_combined_margin_target_logits():
    logits = np.asarray(combined_margin_logits(COSINES, LABELS, scale=64.0, m1=1.1, m2=0.3, m3=0.2))
    expected = (
        64 * (math.cos(1.1 * math.acos(0.5) + 0.3) - 0.2),
        64 * (math.cos(1.1 * math.acos(0.8) + 0.3) - 0.2),
    )
    np.testing.assert_allclose(_target_values(logits), expected, rtol=1e-5)


@pytest.mark.parametrize("margins", [dict(m3=0.4), dict(m2=0.5), dict(m1=1.35, m3=0.1)])
def test_non_targets_and_ignored_rows_are_only_scaled(margins):
    logits = np.asarray(combined_margin_logits(COSINES, LABELS, scale=64.0, **margins))
    is_target = np.zeros_like(COSINES, dtype=bool)
    is_target[0, 1] = is_target[1, 0] = True
    np.testing.assert_allclose(logits[~is_target], 64 * COSINES[~is_target], rtol=1e-6)
    np.testing.assert_allclose(logits[2], 64 * COSINES[2], rtol=1e-6)  # label -1 row


def test_cosines_at_plus_minus_one_stay_finite():
    cos = np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)
    logits = combined_margin_logits(cos, np.array([0, 0]), m2=0.5)
    grads = jax.grad(
        lambda c: combined_margin_logits(c, jnp.array([0, 0]), m2=0.5, straight_through=False).sum()
    )(cos)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(grads))
    # No theta + m > pi correction: cos(theta + 0.5) is used as is (arcface_torch behaviour),
    # with theta = acos of the cosine clipped to -1 + 1e-7 (rounded to float32).
    theta = math.acos(float(np.float32(-1 + 1e-7)))
    np.testing.assert_allclose(logits[1, 0], 64 * math.cos(theta + 0.5), rtol=1e-5)
    np.testing.assert_allclose(
        logits[0, 0], 64 * math.cos(math.acos(float(np.float32(1 - 1e-7))) + 0.5), rtol=1e-5
    )


def test_arcface_straight_through_gradient_is_scale():
    def target_logit(cos, straight_through):
        return combined_margin_logits(
            cos, LABELS, scale=64.0, m2=0.5, straight_through=straight_through
        )[0, 1]

    grad = np.asarray(jax.grad(target_logit)(jnp.asarray(COSINES), True))
    expected = np.zeros_like(COSINES)
    expected[0, 1] = 64.0
    np.testing.assert_allclose(grad, expected, rtol=1e-6)

    # Without straight-through: d/dc 64 cos(acos c + m) = 64 sin(acos c + m) / sqrt(1 - c^2).
    grad_exact = np.asarray(jax.grad(target_logit)(jnp.asarray(COSINES), False))
    c = 0.5
    np.testing.assert_allclose(
        grad_exact[0, 1], 64 * math.sin(math.acos(c) + 0.5) / math.sqrt(1 - c * c), rtol=1e-4
    )


def _adaface_numpy(cos, labels, norms, mean, std, m, h, s, t_alpha, eps):
    """AdaFace reference code, transcribed to float64 NumPy."""
    cos = np.clip(cos.astype(np.float64), -1 + eps, 1 - eps)
    safe = np.clip(norms.astype(np.float64), 0.001, 100)
    new_mean = safe.mean() * t_alpha + (1 - t_alpha) * mean
    new_std = safe.std(ddof=1) * t_alpha + (1 - t_alpha) * std
    scaler = np.clip((safe - new_mean) / (new_std + eps) * h, -1, 1)
    one_hot = np.zeros_like(cos)
    for i, label in enumerate(labels):
        if label >= 0:
            one_hot[i, label] = 1.0
    theta = np.arccos(cos)
    theta_m = np.clip(theta + one_hot * (-m * scaler)[:, None], eps, np.pi - eps)
    out = np.cos(theta_m) - one_hot * (m + m * scaler)[:, None]
    return out * s, new_mean, new_std


@pytest.mark.parametrize("mean,std", [(ADAFACE_INITIAL_MEAN, ADAFACE_INITIAL_STD), (10.0, 2.0)])
def test_adaface_matches_numpy_reference(mean, std):
    rng = np.random.default_rng(0)
    cos = rng.uniform(-1, 1, size=(6, 5)).astype(np.float32)
    cos[0, 0] = 1.0  # exercises the eps clamp
    labels = np.array([0, 3, -1, 4, 1, 2], np.int32)
    # Spread wide enough that some margin scalers clip at +-1 with (mean, std) = (10, 2).
    norms = np.array([2.0, 9.0, 11.0, 30.0, 0.0001, 17.0], np.float32)
    logits, new_mean, new_std = adaface_logits(
        cos, labels, norms, mean, std, margin=0.4, h=0.333, scale=64.0, t_alpha=0.01, eps=1e-3
    )
    ref, ref_mean, ref_std = _adaface_numpy(
        cos, labels, norms, mean, std, 0.4, 0.333, 64.0, 0.01, 1e-3
    )
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose([float(new_mean), float(new_std)], [ref_mean, ref_std], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(logits)[2], 64 * np.clip(cos[2], -0.999, 0.999), rtol=1e-6
    )  # label -1 row: no margin


def test_adaface_stats_helper_and_column_norms():
    norms = np.array([[10.0], [12.0], [14.0]], np.float32)  # (B, 1) as AdaFace passes them
    new_mean, new_std = adaface_update_stats(norms, 20.0, 100.0, t_alpha=0.5)
    # batch mean 12, unbiased std sqrt((4 + 0 + 4) / 2) = 2
    np.testing.assert_allclose([float(new_mean), float(new_std)], [16.0, 51.0], rtol=1e-6)
    with pytest.raises(ValueError, match="1"):
        adaface_update_stats(np.array([3.0]), 20.0, 100.0)


def test_adaface_extremes_hand_computed():
    # Two rows, norms far apart with tiny running std: scalers clip to -1 and +1.
    cos = np.array([[0.5, 0.0], [0.0, 0.5]], np.float32)
    logits, _, _ = adaface_logits(
        cos, np.array([0, 1]), np.array([1.0, 99.0]), 50.0, 0.01, margin=0.4, scale=1.0, t_alpha=0.0
    )
    theta = math.acos(0.5)
    np.testing.assert_allclose(float(logits[0, 0]), math.cos(theta + 0.4), rtol=1e-5)  # ArcFace
    np.testing.assert_allclose(float(logits[1, 1]), math.cos(theta - 0.4) - 0.8, atol=1e-6)


def _numpy_log_softmax(x):
    x = x.astype(np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_cross_entropy_and_accuracy_match_numpy():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(5, 7)) * 10).astype(np.float32)
    labels = np.array([2, -1, 0, 6, 3], np.int32)
    labels[0] = int(np.argmax(logits[0]))  # at least one correct prediction
    loss, accuracy = softmax_cross_entropy(logits, labels)
    assert softmax_cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)[0].dtype == jnp.float32
    valid = labels >= 0
    log_probs = _numpy_log_softmax(logits)
    expected_loss = -np.mean([log_probs[i, labels[i]] for i in np.flatnonzero(valid)])
    expected_acc = np.mean([np.argmax(logits[i]) == labels[i] for i in np.flatnonzero(valid)])
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(float(accuracy), expected_acc, rtol=1e-6)
    assert expected_acc > 0


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient():
    logits = jnp.ones((3, 4))
    labels = jnp.array([-1, -1, -1])
    loss, accuracy = softmax_cross_entropy(logits, labels)
    assert float(loss) == 0.0 and float(accuracy) == 0.0
    grad = jax.grad(lambda x: softmax_cross_entropy(x, labels)[0])(logits)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_cross_entropy_uniform_logits_is_log_num_classes():
    loss, _ = softmax_cross_entropy(jnp.zeros((2, 10)), jnp.array([3, 9]))
    np.testing.assert_allclose(float(loss), math.log(10), rtol=1e-6)
