"""The per-class running means of the agreement target (losses/class_means.py) against a
numpy reference; their split over 8 fake devices is checked by recognizability_sharded_check.py."""

import jax.numpy as jnp
import numpy as np

from facemoe_jax.losses import class_means


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_class_means(mean, count, embeddings, labels, window):
    """The update, class by class: exact mean of the first `window` images, then an
    EMA of rate 1 / window (images of one class in one step: their mean enters at once)."""
    mean, count = mean.copy(), count.copy()
    u = unit(embeddings)
    for y in np.unique(labels):
        rows = u[labels == y]
        n = len(rows)
        denominator = max(min(count[y] + n, window), n)
        mean[y] = mean[y] + (rows.sum(0) - n * mean[y]) / denominator
        count[y] += n
    return mean, count


def test_class_means_average_then_forget_like_numpy():
    rng = np.random.default_rng(3)
    classes, dim, window = 6, 5, 3
    state = {"mean": jnp.zeros((classes + 2, dim)), "count": jnp.zeros((classes + 2,))}
    mean, count = np.zeros((classes + 2, dim)), np.zeros(classes + 2)
    for step in range(6):
        labels = np.array([0, 0, 1, 2, 2, 2, 2, step % classes])  # class 2: 4 > window at once
        e = rng.normal(size=(len(labels), dim))
        state = class_means.update(
            state, jnp.asarray(e, jnp.float32), labels, window, class_axes=()
        )
        mean, count = numpy_class_means(mean, count, e, labels, window)
        np.testing.assert_allclose(np.asarray(state["mean"]), mean, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state["count"]), count)
    # Class 1 got one image a step: after `window` steps its mean is their plain average.
    first = {"mean": jnp.zeros((2, dim)), "count": jnp.zeros((2,))}
    images = rng.normal(size=(window, dim))
    for image in images:
        first = class_means.update(
            first, jnp.asarray(image[None], jnp.float32), np.array([1]), window, class_axes=()
        )
    np.testing.assert_allclose(np.asarray(first["mean"][1]), unit(images).mean(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(first["mean"][0]), 0.0)  # untouched row


def test_images_of_no_class_are_neither_entered_nor_looked_up():
    # Label -1 (an identity with too few images, data/folder.py): the "agreement" target gives
    # such a copy count 0, i.e. weight 0 in the quality loss (data/sources.py relies on it).
    state = {"mean": jnp.ones((3, 4)), "count": jnp.full((3,), 2.0)}
    e = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)), jnp.float32)
    labels = np.array([-1, 1])
    agreement, count = class_means.lookup(state, e, labels, class_axes=())
    assert float(agreement[0]) == 0.0 and float(count[0]) == 0.0 and float(count[1]) == 2.0
    new = class_means.update(state, e, labels, 8, class_axes=())
    np.testing.assert_array_equal(np.asarray(new["count"]), [2.0, 3.0, 2.0])
    np.testing.assert_array_equal(np.asarray(new["mean"])[[0, 2]], 1.0)
