"""The recognizability index, the diversion loss, the EMA centre: against numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from facemoe_jax.losses import class_means
from facemoe_jax.losses import recognizability as ri
from tests.check_scripts import last_line, run_check_script


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_ri(e, centers, labels, num_classes, centre, ui_weight, ui_scale, margin_scale):
    """The module docstring's formula, written out with loops."""
    e, w = unit(e), unit(centers[:num_classes])
    out = []
    for i, y in enumerate(labels):
        cos = w @ e[i]
        theta_p = np.arccos(np.clip(cos[y], -1, 1))
        theta_n = np.arccos(np.clip(max(c for j, c in enumerate(cos) if j != y), -1, 1))
        theta_ui = np.arccos(np.clip(e[i] @ centre, -1, 1))
        s_ui = min(max(theta_ui / ui_scale, 0.0), 1.0)
        s_cls = min(max(0.5 + (theta_n - theta_p) / (2 * margin_scale), 0.0), 1.0)
        out.append(ui_weight * s_ui + (1 - ui_weight) * s_cls)
    return np.array(out)


def test_recognizability_index_matches_numpy():
    rng = np.random.default_rng(0)
    num_classes, dim = 11, 16
    centers = np.concatenate([rng.normal(size=(num_classes, dim)), np.zeros((5, dim))])
    labels = rng.integers(0, num_classes, 24)
    # Embeddings near their class (high RI) to far from it (low RI), and some near the centre.
    e = unit(centers[labels]) * rng.uniform(0, 3, (24, 1)) + rng.normal(size=(24, dim))
    centre = unit(rng.normal(size=dim))
    e[:4] = centre + 0.1 * rng.normal(size=(4, dim))
    cos_ui = unit(e) @ centre
    own, hardest = ri.prototype_cosines(
        jnp.asarray(e, jnp.float32),
        jnp.asarray(centers),
        jnp.asarray(labels),
        num_classes=num_classes,
        class_axes=(),
    )
    got = ri.recognizability_index(
        cos_ui, own, hardest, ui_weight=0.3, ui_angle_scale=1.2, margin_angle_scale=0.4
    )
    want = numpy_ri(e, centers, labels, num_classes, centre, 0.3, 1.2, 0.4)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    assert 0.0 <= want.min() < 0.3 and want.max() > 0.7  # the test spans the range


def numpy_copy_target(copies, positives, centers, labels, centre, ui_weight, power):
    """Item 4's target with pi scales: angles spread as pi (theta / pi) ** power; `positives`
    (one vector per copy) in place of the class centre; the hardest negative a class centre."""

    def g(cosine):
        return np.pi * (np.arccos(np.clip(cosine, -1, 1)) / np.pi) ** power

    out = []
    for i, y in enumerate(labels):
        e = unit(copies[i])
        hardest = max(unit(centers[j]) @ e for j in range(len(centers)) if j != y)
        s_cls = np.clip(0.5 + (g(hardest) - g(e @ unit(positives[i]))) / (2 * np.pi), 0, 1)
        out.append(ui_weight * g(e @ centre) / np.pi + (1 - ui_weight) * s_cls)
    return np.array(out)


def test_copy_target_against_the_own_full_size_embedding_matches_numpy():
    rng = np.random.default_rng(5)
    num_classes, dim = 7, 12
    centers = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, 10)
    reference = rng.normal(size=(10, dim)) * 3.0  # raw full-size embeddings: any norm
    copies = reference + rng.uniform(0.2, 2, (10, 1)) * rng.normal(size=(10, dim))
    copies[0] = 2.0 * reference[0]  # the full-size copy itself: angle 0, the top of the range
    centre = unit(rng.normal(size=dim))
    cfg = common.get_base_config().recognizability
    cfg.update(quality_ui_weight=0.25, quality_angle_power=0.5)  # pi scales (the defaults)
    args = (jnp.asarray(centers), jnp.asarray(labels), jnp.asarray(centre, jnp.float32))
    got = ri.copy_index(
        cfg,
        jnp.asarray(copies, jnp.float32),
        *args,
        jnp.asarray(reference, jnp.float32),
        num_classes,
        (),
    )
    want = numpy_copy_target(copies, reference, centers, labels, centre, 0.25, 0.5)
    np.testing.assert_allclose(np.asarray(got)[1:], want[1:], atol=1e-4)
    # At angle 0 the square root magnifies float32's arccos(1 - 6e-8) = 3e-4 rad: 0.005 of RI.
    np.testing.assert_allclose(np.asarray(got)[0], want[0], atol=1e-2)
    # Without a reference, the positive is the class centre (target "prototype").
    got = ri.copy_index(cfg, jnp.asarray(copies, jnp.float32), *args, None, num_classes, ())
    want = numpy_copy_target(copies, centers[labels], centers, labels, centre, 0.25, 0.5)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


@pytest.mark.parametrize("weighting", ["threshold", "soft"])
def test_diversion_loss_and_its_gradient_match_numpy(weighting):
    rng = np.random.default_rng(1)
    cos_ui = rng.uniform(-0.5, 1.0, 32).astype(np.float32)
    index = rng.uniform(0, 1, 32).astype(np.float32)
    loss, grad = jax.value_and_grad(
        lambda c: ri.diversion_loss(c, index, threshold=0.4, margin=0.2, weighting=weighting)
    )(jnp.asarray(cos_ui))
    weights = (index < 0.4).astype(np.float64) if weighting == "threshold" else 1 - index
    np.testing.assert_allclose(loss, np.mean(weights * np.maximum(cos_ui - 0.2, 0)), rtol=1e-6)
    np.testing.assert_allclose(grad, weights * (cos_ui > 0.2) / 32, rtol=1e-6)
    # RI is a selector, never a path: no gradient reaches it.
    assert not np.any(
        jax.grad(
            lambda r: ri.diversion_loss(
                jnp.asarray(cos_ui), r, threshold=0.4, margin=0.2, weighting="soft"
            )
        )(jnp.asarray(index))
    )


def test_ema_centre_matches_numpy_from_zero():
    rng = np.random.default_rng(2)
    centre = jnp.zeros(8, jnp.float32)
    want = np.zeros(8)
    for step in range(3):
        batch = rng.normal(size=(5, 8)) + 2.0
        centre = ri.update_centre(centre, jnp.asarray(batch, jnp.float32), 0.9)
        direction = unit(np.mean(unit(batch), axis=0))
        want = unit(0.9 * want + 0.1 * direction) if step else direction  # c = 0: u exactly
        np.testing.assert_allclose(np.asarray(centre), want, atol=1e-6)


def test_agreement_target_matches_numpy():
    rng = np.random.default_rng(4)
    copies, reference = rng.normal(size=(7, 8)), rng.normal(size=(7, 8))
    means = {
        "mean": jnp.asarray(rng.normal(size=(5, 8)) * 0.2, jnp.float32),
        "count": jnp.asarray([0, 2, 1, 9, 0], jnp.float32),
    }
    labels = np.array([0, 1, 2, 3, 3, 1, 4])
    agreement, count = class_means.lookup(
        means, jnp.asarray(copies, jnp.float32), labels, class_axes=()
    )
    expected = np.sum(unit(copies) * np.asarray(means["mean"])[labels], axis=1)
    np.testing.assert_allclose(np.asarray(agreement), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(count), [0, 2, 1, 9, 9, 2, 0])
    target = ri.agreement_index(
        jnp.asarray(copies, jnp.float32),
        jnp.asarray(reference, jnp.float32),
        agreement,
        agreement_weight=0.3,
        angle_power=0.5,
    )
    theta = np.arccos(np.clip(np.sum(unit(copies) * unit(reference), axis=1), -1, 1))
    resolution = 1 - (theta / np.pi) ** 0.5
    np.testing.assert_allclose(
        np.asarray(target), 0.7 * resolution + 0.3 * np.clip(expected, 0, 1), atol=1e-5
    )
    # A copy of its own full-size image (angle 0) with full agreement scores 1.
    same = ri.agreement_index(
        jnp.asarray(copies[:1]),
        jnp.asarray(copies[:1]),
        jnp.ones((1,)),
        agreement_weight=0.5,
        angle_power=0.5,
    )
    np.testing.assert_allclose(np.asarray(same), [1.0], atol=1e-3)


def test_weighted_smooth_l1_ignores_weight_zero():
    p, t = np.array([0.1, 0.9, 0.5]), np.array([0.2, 0.0, 0.5])
    assert float(ri.smooth_l1(p, t, 0.75, np.array([1.0, 0.0, 1.0]))) == pytest.approx(
        0.5 * (0.5 * 0.01 / 0.75 + 0.0), rel=1e-5
    )
    assert float(ri.smooth_l1(p, t, 0.75, np.zeros(3))) == 0.0


def test_smooth_l1_matches_numpy():
    d = np.array([-2.0, -0.5, 0.0, 0.3, 0.74, 0.76, 1.5], np.float32)
    want = np.where(np.abs(d) < 0.75, 0.5 * d**2 / 0.75, np.abs(d) - 0.375).mean()
    np.testing.assert_allclose(ri.smooth_l1(d, np.zeros_like(d), 0.75), want, rtol=1e-6)


def test_degraded_copies_keep_only_a_few_pixels_of_information():
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 24, 24, 3)), jnp.float32)
    out = ri.degrade_beyond_recognition(images, jax.random.PRNGKey(0), 4, 0.0)
    assert out.shape == images.shape
    # Without noise: a 4 x 4 image upsampled, so neighbouring pixels barely differ.
    assert float(jnp.mean(jnp.abs(jnp.diff(out, axis=1)))) < 0.2 * float(
        jnp.mean(jnp.abs(jnp.diff(images, axis=1)))
    )
    noisy = ri.degrade_beyond_recognition(images, jax.random.PRNGKey(0), 4, 0.1)
    assert float(jnp.max(jnp.abs(noisy))) <= 1.0 and not np.allclose(noisy, out)


def test_quality_copies_span_the_sizes_in_groups():
    rng = np.random.default_rng(4)
    images = jnp.asarray(rng.uniform(-1, 1, (7, 24, 24, 3)), jnp.float32)
    copies = np.asarray(ri.quality_copies(images, (4, 12), count=6))
    assert copies.shape == (6, 24, 24, 3)
    # Groups of i mod 3: 4 px (0, 3), 12 px (1, 4), full size (2, 5: the input itself).
    np.testing.assert_array_equal(copies[[2, 5]], np.asarray(images)[[2, 5]])
    roughness = [float(np.mean(np.abs(np.diff(copies[[i, i + 3]], axis=1)))) for i in (0, 1, 2)]
    assert roughness[0] < roughness[1] < roughness[2]  # fewer pixels, smoother copy
    # A resize down and back averages pixels: each copy keeps its face's mean colour.
    np.testing.assert_allclose(
        copies.mean(axis=(1, 2)), np.asarray(images[:6]).mean(axis=(1, 2)), atol=0.03
    )


@pytest.mark.slow
def test_sharded_hardest_negative_equals_single_device_on_8_devices():
    done = run_check_script(__file__, "recognizability_sharded_check.py")
    assert last_line(done) == "ok"
