"""Run in a subprocess with 8 fake CPU devices: one train-step computation on several meshes.

Prints one JSON object: for each (capacity|dropless, mesh) the largest differences of the
embeddings, loss and gradients from the single-device run, the collectives in the compiled
HLO, and the parameter bytes held by device 0. tests/parallel/test_expert_parallel.py asserts
on it; running all meshes in one process pays the JAX start-up once.
"""

import json
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
import optax  # noqa: E402

from configs import common  # noqa: E402
from facemoe_jax.core.images import normalize_images  # noqa: E402
from facemoe_jax.losses import classifier  # noqa: E402
from facemoe_jax.models import build_model  # noqa: E402
from facemoe_jax.parallel import mesh as mesh_lib  # noqa: E402
from facemoe_jax.parallel import sharding  # noqa: E402
from facemoe_jax.train import state as state_lib  # noqa: E402
from facemoe_jax.train import step as step_lib  # noqa: E402
from facemoe_jax.train.objectives import margin as margin_lib  # noqa: E402

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
BATCH = mesh_lib.BATCH_AXES


def tiny_config(capacity_factor: float, margin: str):
    config = common.get_base_config()
    config.model.update(
        image_size=16,
        patch_size=4,
        width=32,
        depth=1,
        num_heads=2,
        mlp_ratio=2.0,
        embed_dim=32,
        moe_layers="all",
        num_experts=8,
        top_k=2,
        capacity_factor=capacity_factor,
        drop_path_rate=0.0,
    )
    # 37 classes in rows padded to 40: five rows per device on 8 devices, the last three zero.
    config.data.num_classes = 37
    # ArcFace (m2) exercises the acos path of the margins on the shifted labels.
    config.loss.update(class_rows_multiple=8, margin=margin, m2=0.5, m3=0.0)
    config.loss.update(z_coef=1e-2, balance_coef=1e-1)
    return config


def batch(num_images: int = 16, size: int = 16):
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (num_images, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, 37, (num_images,)).astype(np.int32),
    }


def max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def collectives(hlo: str) -> dict[str, int]:
    names = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
    return {name: hlo.count(f" {name}(") + hlo.count(f" {name}-start(") for name in names}


def run(capacity_factor: float) -> dict:
    config = tiny_config(capacity_factor, "combined")
    model = build_model(config.model)
    state = state_lib.create_train_state(model, optax.sgd(0.1), config)
    loss_fn = step_lib.make_loss_fn(model, config)

    def loss_grads_embeddings(params, state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, state, batch)[0])(params)
        variables = {"params": params["encoder"], "batch_stats": state.batch_stats}
        embeddings = model.apply(variables, normalize_images(batch["image"]), train=False)[0]
        return loss, grads, embeddings

    data = batch()
    ref_loss, ref_grads, ref_emb = jax.jit(loss_grads_embeddings)(state.params, state, data)
    results = {"reference_loss": float(ref_loss)}
    for shape in MESHES:
        config.mesh.update(data=shape[0], expert=shape[1])
        mesh = mesh_lib.make_mesh(config.mesh)
        sharded_state = jax.device_put(
            state, sharding.state_shardings(state, mesh, config.sharding_rules)
        )
        sharded_batch = mesh_lib.global_batch(data, mesh)
        args = (sharded_state.params, sharded_state, sharded_batch)
        with jax.set_mesh(mesh):
            compiled = jax.jit(loss_grads_embeddings).lower(*args).compile()
        loss, grads, emb = compiled(*args)
        experts = [
            leaf
            for path, leaf in jax.tree.leaves_with_path(sharded_state.params)
            if "experts" in sharding.path_name(path)
        ]
        centers = sharded_state.params["classifier"]
        results[f"{shape[0]}x{shape[1]}"] = {
            "loss_diff": abs(float(loss) - float(ref_loss)),
            "embedding_diff": max_diff(emb, ref_emb),
            "grad_diff": max_diff(grads, ref_grads),
            "grad_scale": max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads)),
            "collectives": collectives(compiled.as_text()),
            "device0_param_bytes": sharding.bytes_per_device(sharded_state.params)[0],
            "device0_expert_bytes": sharding.bytes_per_device(experts)[0],
            "device0_center_bytes": sharding.bytes_per_device(centers)[0],
        }
    return results


def classifier_only(margin: str, sample_rate: float, num_classes: int = 37) -> dict:
    """The class-sharded margin loss against the unsharded one, without a model."""
    config = tiny_config(0.0, margin)
    config.loss.sample_rate = sample_rate
    rng = np.random.default_rng(1)
    embeddings = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
    rows = classifier.padded_num_classes(num_classes, 8)
    centers = classifier.init_class_centers(jax.random.PRNGKey(3), num_classes, 32, num_rows=rows)
    labels = jnp.asarray(rng.integers(0, num_classes, 16), jnp.int32)
    margin_state = {"mean": jnp.float32(20.0), "std": jnp.float32(100.0)}

    def loss(emb, cen, axes):
        margin_fn, _ = margin_lib.margin_fn_and_state(config.loss, emb, margin_state)
        value, metrics = classifier.sharded_margin_classifier_loss(
            emb,
            cen,
            labels,
            jax.random.PRNGKey(5),
            sample_rate=sample_rate,
            margin_fn=margin_fn,
            num_classes=num_classes,
            class_axes=axes,
        )
        return value, metrics["accuracy"]

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (ref, ref_acc), ref_grads = jax.jit(grad, static_argnums=2)(embeddings, centers, ())
    mesh = mesh_lib.make_mesh(config.mesh.__class__(dict(data=2, expert=4)))
    with jax.set_mesh(mesh):
        sharded_centers = jax.device_put(
            centers, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH))
        )
        (value, acc), grads = jax.jit(grad, static_argnums=2)(embeddings, sharded_centers, BATCH)
    return {
        "loss": float(value),
        "loss_diff": abs(float(value) - float(ref)),
        "accuracy_diff": abs(float(acc) - float(ref_acc)),
        "grad_diff": max_diff(grads, ref_grads),
        # Centre rows with a gradient: the sampled ones (all 37 real rows at sample_rate 1).
        "rows_with_grad": int(jnp.sum(jnp.any(grads[1] != 0, axis=1))),
        "padding_rows_with_grad": int(jnp.sum(jnp.any(grads[1][num_classes:] != 0, axis=1))),
        "label_rows_with_grad": int(jnp.sum(jnp.any(grads[1][labels] != 0, axis=1))),
    }


def router_statistics() -> dict:
    """An MoE layer's balance losses on 16 images under the 4x2 mesh (2 images per device),
    with the router logits for the test's numpy reference."""
    from facemoe_jax.models import moe

    layer = moe.MoEFeedForward(num_experts=8, top_k=2, hidden_dim=16, capacity_factor=0.0)
    x = jax.random.normal(jax.random.PRNGKey(7), (16, 5, 32))
    variables = layer.init(jax.random.PRNGKey(8), x)
    apply = jax.jit(lambda v, x: layer.apply(v, x)[1])
    single = apply(variables, x)
    mesh = mesh_lib.make_mesh(tiny_config(0.0, "combined").mesh.__class__(dict(data=4, expert=2)))
    with jax.set_mesh(mesh):
        sharded = apply(variables, jax.device_put(x, mesh_lib.batch_sharding(mesh)))
    keys = ("official_load_balance_loss", "load_balance_loss")
    logits = np.asarray(x @ variables["params"]["router"]["gate"]["kernel"])
    return {
        "logits": logits.tolist(),
        "single": {k: float(single[k]) for k in keys}
        | {k + "/per_device": float(single[k + "/per_device"]) for k in keys},
        "mesh": {k: float(sharded[k]) for k in keys}
        | {k + "/per_device": float(sharded[k + "/per_device"]) for k in keys},
    }


if __name__ == "__main__":
    print(
        json.dumps(
            {
                "capacity": run(capacity_factor=1.0),
                "dropless": run(capacity_factor=0.0),
                "classifier_cosface": classifier_only("combined", 1.0),
                "classifier_adaface": classifier_only("adaface", 1.0),
                # 803 classes in 808 rows, 101 per device: each samples max(30, 16) of its rows.
                "classifier_sampled": classifier_only("combined", 0.3, num_classes=803),
                "router_statistics": router_statistics(),
            }
        )
    )
