"""Run in a subprocess with 8 fake CPU devices: `prototype_cosines` with the class centres split
over the mesh (pmax of the hardest negative, psum of the own-class cosine) equals one device, and
so do the class means of the "agreement" target (`class_means.lookup`, `class_means.update`) with
their rows split the same way. Prints "ok" as its last line; tests/losses/test_recognizability.py
runs it."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + os.environ.get(
    "XLA_FLAGS", ""
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from facemoe_jax.losses import class_means  # noqa: E402
from facemoe_jax.losses import recognizability as ri  # noqa: E402

NUM_CLASSES, ROWS, DIM, BATCH = 37, 40, 16, 24  # 3 zero padding rows on the last device


def main():
    rng = np.random.default_rng(0)
    centers = np.concatenate([rng.normal(size=(NUM_CLASSES, DIM)), np.zeros((3, DIM))])
    # Labels on every shard, among them the last real class (next to the padding rows).
    labels = np.concatenate([rng.integers(0, NUM_CLASSES, BATCH - 2), [NUM_CLASSES - 1, 0]])
    embeddings = centers[labels] + rng.normal(size=(BATCH, DIM))
    args = (
        jnp.asarray(embeddings, jnp.float32),
        jnp.asarray(centers, jnp.float32),
        jnp.asarray(labels, jnp.int32),
    )
    single = ri.prototype_cosines(*args, num_classes=NUM_CLASSES, class_axes=())
    for shape, names, class_axes in [
        ((8,), ("classes",), ("classes",)),
        ((2, 4), ("data", "expert"), ("expert",)),
        ((2, 4), ("data", "expert"), ("data", "expert")),
    ]:
        mesh = Mesh(np.asarray(jax.devices()).reshape(shape), names)
        fn = jax.jit(
            lambda e, c, y, axes=class_axes: ri.prototype_cosines(
                e, c, y, num_classes=NUM_CLASSES, class_axes=axes
            )
        )
        with jax.set_mesh(mesh):
            sharded_centers = jax.device_put(args[1], NamedSharding(mesh, P(class_axes)))
            own, hardest = fn(args[0], sharded_centers, args[2])
        np.testing.assert_allclose(np.asarray(own), np.asarray(single[0]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(hardest), np.asarray(single[1]), atol=1e-6)
    check_class_means(rng)
    # The single-device values against numpy.
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    w = centers[:NUM_CLASSES] / np.linalg.norm(centers[:NUM_CLASSES], axis=1, keepdims=True)
    cos = e @ w.T
    own = cos[np.arange(BATCH), labels]
    cos[np.arange(BATCH), labels] = -np.inf
    np.testing.assert_allclose(np.asarray(single[0]), own, atol=1e-5)
    np.testing.assert_allclose(np.asarray(single[1]), cos.max(axis=1), atol=1e-5)
    print("ok")


def check_class_means(rng):
    """Lookup and update of the per-class means, split over the class axes, equal one device
    (labels repeat, so some rows take several images in one update)."""
    means = {
        "mean": jnp.asarray(
            np.concatenate([rng.normal(size=(NUM_CLASSES, DIM)) * 0.1, np.zeros((3, DIM))]),
            jnp.float32,
        ),
        "count": jnp.asarray(
            np.concatenate([rng.integers(0, 5, NUM_CLASSES), np.zeros(3)]), jnp.float32
        ),
    }
    labels = jnp.asarray(
        np.concatenate([rng.integers(0, NUM_CLASSES, BATCH - 3), [5, 5, 36]]), jnp.int32
    )
    embeddings = jnp.asarray(rng.normal(size=(BATCH, DIM)), jnp.float32)

    def both(m, e, y, axes):
        looked_up = class_means.lookup(m, e, y, class_axes=axes)
        return looked_up, class_means.update(m, e, y, 3, class_axes=axes)

    single = both(means, embeddings, labels, ())
    for shape, names, class_axes in [
        ((8,), ("classes",), ("classes",)),
        ((2, 4), ("data", "expert"), ("data", "expert")),
    ]:
        mesh = Mesh(np.asarray(jax.devices()).reshape(shape), names)
        with jax.set_mesh(mesh):
            split = jax.device_put(means, NamedSharding(mesh, P(class_axes)))
            sharded = jax.jit(lambda m, e, y, axes=class_axes: both(m, e, y, axes))(
                split, embeddings, labels
            )
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


if __name__ == "__main__":
    main()
