"""Run in a subprocess with 4 fake CPU devices: the class-sharded Partial FC at a low rate.

The case of issue 17 item 3: 32 classes, 8 rows per device, global batch 8, sample_rate 0.5.
Each device must keep int(0.5 * 8) = 4 of its rows, or exactly its own positives when the batch
holds more of them; before the fix each device kept max(4, batch 8) = all 8 rows and the loss was
the full softmax. Prints one JSON object that tests/losses/test_classifier.py asserts on.
"""

import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 " + os.environ.get(
    "XLA_FLAGS", ""
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from facemoe_jax.losses import classifier  # noqa: E402
from facemoe_jax.losses.margins import combined_margin_logits  # noqa: E402

COSFACE = functools.partial(combined_margin_logits, scale=16.0, m3=0.4)
NUM_CLASSES, ROWS, DIM, RATE = 32, 8, 16, 0.5
# Device 0 holds classes 0-7: this batch has 6 of them (more than its 4), device 1 none, device 2
# one, device 3 one.
LABELS = np.array([0, 1, 2, 3, 4, 5, 17, 30], np.int32)


def main():
    rng = np.random.default_rng(0)
    embeddings = jnp.asarray(rng.normal(size=(len(LABELS), DIM)), jnp.float32)
    centers = classifier.init_class_centers(jax.random.PRNGKey(1), NUM_CLASSES, DIM)
    key = jax.random.PRNGKey(7)
    mesh = Mesh(np.asarray(jax.devices()).reshape(4), ("classes",))

    def loss(emb, cen, axes):
        value, metrics = classifier.sharded_margin_classifier_loss(
            emb,
            cen,
            LABELS,
            key,
            sample_rate=RATE,
            margin_fn=COSFACE,
            num_classes=NUM_CLASSES,
            class_axes=axes,
        )
        return value, metrics["partial_fc/effective_rate"]

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=2)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(centers, NamedSharding(mesh, P("classes")))
        (value, rates), grads = grad_fn(embeddings, sharded, ("classes",))
    grads = np.asarray(grads)

    # The reference, from the documented rule: on device s, fold the key with s, give each of
    # its rows a uniform score, its positives 2, take the top max(4, positives) rows.
    kept = []
    for shard in range(4):
        scores = np.array(jax.random.uniform(jax.random.fold_in(key, shard), (ROWS,)))
        here = LABELS[(LABELS >= shard * ROWS) & (LABELS < (shard + 1) * ROWS)] - shard * ROWS
        scores[here] = 2.0
        count = max(int(RATE * ROWS), len(np.unique(here)))
        kept += sorted((shard * ROWS + np.argsort(-scores, kind="stable")[:count]).tolist())
    emb = np.asarray(embeddings, np.float64)
    cen = np.asarray(centers, np.float64)[kept]
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        cen / np.linalg.norm(cen, axis=1, keepdims=True)
    ).T
    columns = np.array([kept.index(label) for label in LABELS])
    logits = 16.0 * cos
    logits[np.arange(len(LABELS)), columns] -= 16.0 * 0.4
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    reference = float(np.mean(log_z - logits[np.arange(len(LABELS)), columns]))

    full_cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        np.asarray(centers, np.float64) / np.linalg.norm(centers, axis=1, keepdims=True)
    ).T
    full = 16.0 * full_cos
    full[np.arange(len(LABELS)), LABELS] -= 16.0 * 0.4
    full_log_z = np.log(np.exp(full - full.max(1, keepdims=True)).sum(1)) + full.max(1)
    full_softmax = float(np.mean(full_log_z - full[np.arange(len(LABELS)), LABELS]))

    with_grad = np.any(grads != 0, axis=1)
    print(
        json.dumps(
            {
                "loss": float(value),
                "reference_loss": reference,
                "full_softmax_loss": full_softmax,
                "effective_rate": np.asarray(rates).tolist(),
                "kept_rows": kept,
                "rows_with_grad": np.flatnonzero(with_grad).tolist(),
                "rows_with_grad_per_shard": with_grad.reshape(4, ROWS).sum(1).tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()
