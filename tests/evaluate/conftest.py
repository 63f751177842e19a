"""A tiny random-init ViT-MoE (demo config, 48 px, width 32, depth 2) shared by the eval tests."""

import jax
import jax.numpy as jnp
import pytest

from configs import demo
from facemoe_jax.models import build_model


def tiny_config():
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
    config = tiny_config()
    model = build_model(config.model)
    images = jnp.zeros((2, 48, 48, 3))
    variables = jax.jit(lambda rng, x: model.init(rng, x, train=False))(
        jax.random.PRNGKey(0), images
    )
    return config, model, dict(variables)
