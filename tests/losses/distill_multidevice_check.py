"""Run in a subprocess with 8 fake CPU devices: the distillation losses over a batch sharded on
the mesh's batch axes against one device, alone and inside the train step's loss with a teacher.

Prints one JSON object; tests/losses/test_distill.py asserts on it.
"""

import json
import os
import sys
import types

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + os.environ.get(
    "XLA_FLAGS", ""
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from facemoe_jax.losses import distill  # noqa: E402
from facemoe_jax.models import build_model  # noqa: E402
from facemoe_jax.parallel import mesh as mesh_lib  # noqa: E402
from facemoe_jax.parallel import sharding  # noqa: E402
from facemoe_jax.train import objectives  # noqa: E402
from facemoe_jax.train import state as state_lib  # noqa: E402
from facemoe_jax.train import step as step_lib  # noqa: E402
from tests.train.test_step import tiny_config  # noqa: E402


def losses_report(mesh):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(16, 8)).astype(np.float32)
    teacher = rng.normal(size=(16, 12)).astype(np.float32)
    same_size = (student + rng.normal(scale=0.5, size=student.shape)).astype(np.float32)
    cases = {
        "relation_mse": (lambda s, t: distill.relation_loss(s, t, "mse"), teacher),
        "relation_kl": (lambda s, t: distill.relation_loss(s, t, "kl", 0.2), teacher),
        "instance_cosine": (lambda s, t: distill.instance_loss(s, t, "cosine"), same_size),
    }
    split = mesh_lib.batch_sharding(mesh)
    report = {}
    for name, (fn, target) in cases.items():
        s, t = jax.device_put(student, split), jax.device_put(target, split)
        sharded = float(jax.jit(fn)(s, t))
        one = jax.devices()[0]
        single = float(jax.jit(fn)(jax.device_put(student, one), jax.device_put(target, one)))
        report[name] = {
            "sharded": sharded,
            "single": single,
            "spec_data_axes": len(s.sharding.device_set) == 8,
        }
    return report


def train_step_report(mesh):
    config = tiny_config(num_classes=8)
    config.model.update(moe_layers="none", depth=1)
    config.loss.class_rows_multiple = 8
    config.distill.update(
        teacher="unused",
        instance_weight=2.0,
        relation_weight=10.0,
        instance_form="cosine",
        relation_form="mse",
        temperature=0.1,
    )
    model = build_model(config.model)
    teacher_config = tiny_config()
    teacher_config.model.update(moe_layers="none", width=16, num_heads=2, depth=1)
    teacher_model = build_model(teacher_config.model)
    teacher_variables = jax.jit(lambda k, x: teacher_model.init(k, x, train=False))(
        jax.random.key(3), np.zeros((2, 24, 24, 3), np.float32)
    )

    def load_variables(path, config=None, **_):  # the teacher above, in place of a saved run
        return types.SimpleNamespace(
            origin=path, config=teacher_config, variables=teacher_variables
        )

    active = objectives.build(config, objectives.Resources(mesh, load_variables))
    import optax

    tx = optax.sgd(0.1)
    state = state_lib.create_train_state(model, tx, config)
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.integers(0, 256, (16, 24, 24, 3), dtype=np.uint8),
        "image_hr": rng.integers(0, 256, (16, 24, 24, 3), dtype=np.uint8),
        "label": rng.integers(0, 8, (16,)).astype(np.int32),
    }
    loss_fn = step_lib.make_loss_fn(model, config, active)
    grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
    grads, (_, _, single) = grad_fn(state.params, state, batch, {"distill": teacher_variables})

    shardings = sharding.state_shardings(state, mesh, config.sharding_rules)
    with jax.set_mesh(mesh):
        placed = jax.tree.map(jax.device_put, state, shardings)
        mesh_batch = mesh_lib.global_batch(batch, mesh)
        mesh_teacher = jax.device_put(teacher_variables, mesh_lib.replicated(mesh))
        mesh_grads, (_, _, sharded) = grad_fn(
            placed.params, placed, mesh_batch, {"distill": mesh_teacher}
        )
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(mesh_grads))
    )
    scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(grads))
    keys = ("train/distill_instance", "train/distill_relation", "train/loss")
    return {
        "single": {k: float(single[k]) for k in keys},
        "sharded": {k: float(sharded[k]) for k in keys},
        "grad_diff": diff,
        "grad_scale": scale,
    }


def main():
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 8, "expert": 1}))
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "losses": losses_report(mesh),
                "train_step": train_step_report(mesh),
            }
        )
    )


if __name__ == "__main__":
    main()
