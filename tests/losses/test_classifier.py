"""Normalised classifier and Partial FC sampling."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.losses.classifier import (
    cosine_logits,
    init_class_centers,
    margin_classifier_loss,
    num_sampled_classes,
    partial_fc_sample,
)
from facemoe_jax.losses.margins import combined_margin_logits


def test_init_class_centers_shape_and_scale():
    centers = init_class_centers(jax.random.PRNGKey(0), 2000, 64)
    assert centers.shape == (2000, 64) and centers.dtype == jnp.float32
    np.testing.assert_allclose(float(jnp.std(centers)), 0.01, rtol=0.02)
    np.testing.assert_allclose(float(jnp.mean(centers)), 0.0, atol=2e-4)
    assert init_class_centers(jax.random.PRNGKey(0), 3, 4, jnp.bfloat16).dtype == jnp.bfloat16


def test_cosine_logits_match_numpy():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 8)).astype(np.float32) * 7
    centers = rng.normal(size=(5, 8)).astype(np.float32) * 0.01
    expected = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        centers / np.linalg.norm(centers, axis=1, keepdims=True)
    ).T
    got = np.asarray(cosine_logits(emb, centers))
    assert got.shape == (4, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_cosine_logits_zero_vector_is_safe():
    emb = jnp.array([[0.0, 0.0], [3.0, 4.0]])
    centers = jnp.array([[1.0, 0.0]])
    np.testing.assert_allclose(np.asarray(cosine_logits(emb, centers)), [[0.0], [0.6]], atol=1e-7)
    grad = jax.grad(lambda e: cosine_logits(e, centers).sum())(emb)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_num_sampled_classes():
    assert num_sampled_classes(100, 1.0, 8) == 100
    assert num_sampled_classes(100, 0.3, 8) == 30
    assert num_sampled_classes(100, 0.05, 8) == 8  # at least the batch size
    assert num_sampled_classes(10, 0.5, 16) == 10  # capped at num_classes
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            num_sampled_classes(100, bad, 8)


LABELS = np.array([3, 7, 7, 49, 0, -1], np.int32)


def test_partial_fc_sample_properties():
    class_index, local = partial_fc_sample(jax.random.PRNGKey(1), LABELS, 50, 12)
    class_index, local = np.asarray(class_index), np.asarray(local)
    assert class_index.shape == (12,) and class_index.dtype == np.int32
    assert local.shape == LABELS.shape
    assert len(set(class_index.tolist())) == 12  # no duplicates
    assert np.all(np.diff(class_index) > 0) and class_index.min() >= 0 and class_index.max() < 50
    assert {3, 7, 49, 0} <= set(class_index.tolist())  # every positive kept
    valid = LABELS >= 0
    np.testing.assert_array_equal(class_index[local[valid]], LABELS[valid])
    assert local[~valid].tolist() == [-1]


def test_partial_fc_sample_deterministic_and_varies_with_rng():
    first = partial_fc_sample(jax.random.PRNGKey(5), LABELS, 50, 12)
    again = partial_fc_sample(jax.random.PRNGKey(5), LABELS, 50, 12)
    other = partial_fc_sample(jax.random.PRNGKey(6), LABELS, 50, 12)
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(again[0]))
    np.testing.assert_array_equal(np.asarray(first[1]), np.asarray(again[1]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_partial_fc_negatives_are_uniform():
    # 4 positive classes, 8 free slots among the 46 others: each other class has p = 8/46.
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    sample = jax.jit(jax.vmap(lambda k: partial_fc_sample(k, LABELS, 50, 12)[0]))
    counts = np.bincount(np.asarray(sample(keys)).ravel(), minlength=50) / 2000
    positives = [0, 3, 7, 49]
    np.testing.assert_array_equal(counts[positives], 1.0)
    others = np.delete(counts, positives)
    # Binomial std at n=2000, p=0.174 is 0.0085; allow ~4.5 sigma.
    np.testing.assert_allclose(others, 8 / 46, atol=0.04)


def test_partial_fc_sample_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"5.*6"):
        partial_fc_sample(jax.random.PRNGKey(0), LABELS, 50, 5)  # 5 < batch of 6
    with pytest.raises(ValueError, match=r"51.*50"):
        partial_fc_sample(jax.random.PRNGKey(0), LABELS, 50, 51)


COSFACE = functools.partial(combined_margin_logits, scale=64.0, m3=0.4)


def test_full_softmax_loss_matches_numpy():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(4, 6)).astype(np.float32)
    centers = rng.normal(size=(9, 6)).astype(np.float32)
    labels = np.array([0, 8, 3, 3], np.int32)
    loss, metrics = margin_classifier_loss(
        emb, centers, labels, None, sample_rate=1.0, margin_fn=COSFACE
    )
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        centers / np.linalg.norm(centers, axis=1, keepdims=True)
    ).T
    logits = 64.0 * cos.astype(np.float64)
    logits[np.arange(4), labels] -= 64.0 * 0.4
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(float(loss), -log_probs[np.arange(4), labels].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["accuracy"]), np.mean(cos.argmax(axis=1) == labels), atol=1e-7
    )
    assert set(metrics) == {"loss/margin_ce", "accuracy"}


def test_jitted_sampled_loss_gradient_only_on_sampled_rows():
    num_classes, dim = 40, 8
    rng = jax.random.PRNGKey(3)
    emb = jax.random.normal(jax.random.PRNGKey(4), (6, dim))
    centers = init_class_centers(jax.random.PRNGKey(5), num_classes, dim)
    labels = jnp.array([1, 5, 5, 17, 33, 39])

    @jax.jit
    def loss_fn(centers, emb, labels, rng):
        return margin_classifier_loss(
            emb, centers, labels, rng, sample_rate=0.25, margin_fn=COSFACE
        )

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(centers, emb, labels, rng)
    assert np.isfinite(float(loss)) and float(loss) > 0
    np.testing.assert_allclose(float(metrics["loss/margin_ce"]), float(loss))
    num_sampled = num_sampled_classes(num_classes, 0.25, 6)
    assert num_sampled == 10
    class_index = np.asarray(partial_fc_sample(rng, labels, num_classes, num_sampled)[0])
    row_grad_norms = np.linalg.norm(np.asarray(grad), axis=1)
    unsampled = np.setdiff1d(np.arange(num_classes), class_index)
    np.testing.assert_array_equal(row_grad_norms[unsampled], 0.0)
    assert np.all(row_grad_norms[class_index] > 0)


def test_sampling_requires_rng():
    with pytest.raises(ValueError, match="0.5"):
        margin_classifier_loss(jnp.ones((2, 3)), jnp.ones((10, 3)), jnp.array([0, 1]), None,
                               sample_rate=0.5, margin_fn=COSFACE)
    with pytest.raises(ValueError, match="0.0"):
        margin_classifier_loss(jnp.ones((2, 3)), jnp.ones((10, 3)), jnp.array([0, 1]), None,
                               sample_rate=0.0, margin_fn=COSFACE)
