"""The train state: everything a checkpoint needs to continue a run exactly.

params = {"encoder": model params, "classifier": {"centers": (rows, embed_dim)}}: the class
centres are one global array (not per-device files), so a checkpoint restores onto any mesh;
rows is num_classes rounded up to config.loss.class_rows_multiple (zero rows, never trained) so
the class axis splits evenly over the devices whatever their number.
`rng` is a raw uint32 key (checkpointable as a plain array); each step derives its randomness
with fold_in(rng, step), so a resumed run draws the same numbers as an uninterrupted one.
`aux` maps an objective's name to its persistent state (train/objectives/): AdaFace's running
norm statistics under "margin", the recognizability index's centre, the quality head's
per-class means. An objective that keeps nothing has no entry.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from facemoe_jax.losses import classifier
from facemoe_jax.train import objectives

# Where state written before `aux` existed kept what now lives in it (train/checkpoint.py reads
# such checkpoints): old top-level field -> path in aux.
LEGACY_AUX_FIELDS = {
    "margin_state": ("margin",),
    "ri_centre": ("recognizability", "centre"),
    "ri_classes": ("quality", "per_class"),
}


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    aux: dict


def init_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    rng: jax.Array,
) -> TrainState:
    """A fresh state; pure, so it can run under jit with out_shardings (created in place)."""
    init_rng, centers_rng, dropout_rng, run_rng = jax.random.split(rng, 4)
    size = config.model.image_size
    images = jnp.zeros((2, size, size, 3), jnp.float32)
    variables = model.init({"params": init_rng, "dropout": dropout_rng}, images, train=False)
    num_rows = classifier.padded_num_classes(
        config.data.num_classes, config.loss.class_rows_multiple
    )
    params = {
        "encoder": variables["params"],
        "classifier": {
            "centers": classifier.init_class_centers(
                centers_rng, config.data.num_classes, config.model.embed_dim, num_rows=num_rows
            )
        },
    }
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),  # none in a BN-folded ONNX graph
        opt_state=optimizer.init(params),
        rng=run_rng,
        aux=objectives.initial_aux(config, num_rows),
    )


def create_train_state(model, optimizer, config, shardings=None) -> TrainState:
    """Initialises the state from config.seed directly into `shardings` (a tree or one sharding)."""
    rng = jax.random.PRNGKey(config.seed)
    init = jax.jit(lambda r: init_train_state(model, optimizer, config, r), out_shardings=shardings)
    return init(rng)


def abstract_train_state(model, optimizer, config) -> TrainState:
    """Shapes and dtypes only (for restoring and for sharding decisions), no memory."""
    return jax.eval_shape(
        lambda r: init_train_state(model, optimizer, config, r), jax.random.PRNGKey(0)
    )


def count_class_centre_params(params, config) -> int:
    """Parameters of the real class centres (padding rows excluded)."""
    return config.data.num_classes * params["classifier"]["centers"].shape[1]


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
