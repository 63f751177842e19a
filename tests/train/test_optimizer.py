"""Learning-rate schedule and optimiser choice."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from facemoe_jax.train.optimizer import build_optimizer, learning_rate_schedule


def opt_config(**overrides):
    cfg = common.get_base_config().optimizer
    cfg.update(**overrides)
    return cfg


def test_warmup_then_polynomial_decay_matches_formula():
    cfg = opt_config(learning_rate=0.1, warmup_steps=10, decay_power=2.0, end_learning_rate=0.0)
    schedule = learning_rate_schedule(cfg, num_steps=110)
    for step in (0, 5, 10, 35, 60, 109, 110):
        if step < 10:
            expected = 0.1 * step / 10
        else:
            expected = 0.1 * (1 - (step - 10) / 100) ** 2
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-9)


def test_run_shorter_than_warmup_stays_on_the_ramp():
    schedule = learning_rate_schedule(opt_config(learning_rate=1.0, warmup_steps=100), 2)
    np.testing.assert_allclose([schedule(0), schedule(1)], [0.0, 0.01], atol=1e-7)


def test_sgd_uses_coupled_weight_decay():
    cfg = opt_config(
        name="sgd",
        learning_rate=0.5,
        momentum=0.0,
        weight_decay=0.1,
        warmup_steps=0,
        grad_clip_norm=0.0,
        decay_power=1.0,
        end_learning_rate=0.5,
    )
    tx, _ = build_optimizer(cfg, num_steps=10)
    params = {"w": jnp.array([2.0])}
    updates, _ = tx.update({"w": jnp.array([1.0])}, tx.init(params), params)
    # PyTorch SGD: w -= lr * (g + wd * w) = 2 - 0.5 * (1 + 0.2)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], [1.4], rtol=1e-6)


def test_gradient_clipping_bounds_the_update():
    cfg = opt_config(
        name="sgd",
        learning_rate=1.0,
        momentum=0.0,
        weight_decay=0.0,
        warmup_steps=0,
        grad_clip_norm=1.0,
        decay_power=1.0,
        end_learning_rate=1.0,
    )
    tx, _ = build_optimizer(cfg, num_steps=10)
    params = {"w": jnp.zeros(2)}
    updates, _ = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(name="lamb"), "config.optimizer.name='lamb'"),
        (dict(warmup_steps=-1), "warmup_steps=-1"),
        (dict(grad_clip_norm=-1.0), "grad_clip_norm=-1.0"),
    ],
)
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(opt_config(**overrides), num_steps=50)
