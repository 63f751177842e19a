"""Test-wide settings: keep TensorFlow off accelerators and JAX deterministic on CPU."""

import os

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most test time is XLA:CPU compiling small programs, and most of that is LLVM optimising
# machine code the tests then run only a few times: level 0 halves it. The numbers a test checks
# do not depend on it (no fast-math either way). Subprocesses the tests start inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs taking more than ~20 s")


def tiny_config():
    """A tiny ViT-MoE (demo config, 48 px, width 32, depth 2) for the evaluation and adaptation
    tests."""
    from configs import demo

    config = demo.get_config()
    config.model.update(image_size=48, width=32, depth=2, num_heads=2, embed_dim=16)
    config.model.update(moe_layers="every:1", num_experts=4, top_k=2)
    config.eval.update(
        synthetic_pairs=40,
        low_resolutions="8,48",
        batch_size=20,
        routing_map_faces=16,
    )
    return config


@pytest.fixture(scope="session")
def tiny_model():
    """(config, model, variables) of an untrained tiny encoder with non-trivial head statistics."""
    import jax  # here, not at the top: the environment above is set before jax is imported
    import jax.numpy as jnp

    from facemoe_jax.models import build_model

    config = tiny_config()
    model = build_model(config.model)
    images = jnp.zeros((2, 48, 48, 3))
    variables = jax.jit(lambda rng, x: model.init(rng, x, train=False))(
        jax.random.PRNGKey(0), images
    )
    return config, model, dict(variables)
