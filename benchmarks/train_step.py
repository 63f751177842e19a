r"""Whole train steps of one config, dense vs MoE, measured side by side in one run.

  python -m benchmarks.train_step [--config configs/demo.py] [--batch 128] [--steps 10]

For the config's model, its dense twin (moe_layers="none"), the dropless and the capacity MoE
paths, prints compile seconds, XLA FLOPs per step, milliseconds per step, images/s and the ratio
to dense. (The comparison against the PyTorch original is a later benchmark: it needs torch.)
"""

import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.models import build_model
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from facemoe_jax.train import step as step_lib


def load_config(path):
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def measure(config, batch_size, steps):
    model = build_model(config.model)
    tx, schedule = optimizer_lib.build_optimizer(config.optimizer, config.train.num_steps)
    state = state_lib.create_train_state(model, tx, config)
    size = config.model.image_size
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (batch_size, size, size, 3), np.uint8)),
        "label": jnp.asarray(rng.integers(0, config.data.num_classes, batch_size, np.int32)),
    }
    step = jax.jit(step_lib.make_train_step(model, config, tx, schedule), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    return compile_s, float(cost.get("flops", 0.0)), step_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    variants = {
        "dense": dict(moe_layers="none"),
        "MoE dropless": dict(capacity_factor=0.0),
        "MoE capacity 1.25": dict(capacity_factor=1.25),
    }
    print(f"{args.config}, batch {args.batch}, backend {jax.default_backend()}")
    dense_s = None
    for name, overrides in variants.items():
        config = load_config(args.config)
        config.model.update(**overrides)
        compile_s, flops, step_s = measure(config, args.batch, args.steps)
        dense_s = dense_s or step_s
        print(f"{name:>18}: compile {compile_s:5.1f} s, {flops / 1e9:7.2f} GFLOP/step, "
              f"{step_s * 1e3:8.1f} ms/step, {args.batch / step_s:7.1f} img/s, "
              f"{step_s / dense_s:4.2f}x dense")


if __name__ == "__main__":
    main()
