"""Frozen parameters (config.train.trainable), frozen BatchNorm statistics and clip_scope."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from facemoe_jax.models import build_model
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from facemoe_jax.train import step as step_lib
from facemoe_jax.train import trainable
from tests.train.test_step import fixed_batch, tiny_config


def setup(config, num_steps=10):
    model = build_model(config.model)
    tx, schedule = optimizer_lib.build_optimizer(
        config.optimizer, num_steps, config.train.trainable
    )
    state = state_lib.create_train_state(model, tx, config)
    step = jax.jit(step_lib.make_train_step(model, config, tx, schedule))
    return state, step


def frozen_config(patterns, **train):
    config = tiny_config()
    config.model.capacity_factor = 2.0
    # Weight decay on: a frozen parameter must not decay either.
    config.optimizer.update(weight_decay=0.1, learning_rate=1e-2)
    config.train.update(trainable=patterns, **train)
    return config


def run(config, steps=3):
    state, step = setup(config)
    before = jax.device_get(state)
    for i in range(steps):
        state, metrics = step(state, fixed_batch(seed=i))
    return before, jax.device_get(state), metrics


@pytest.mark.parametrize("patterns", ["^classifier/", "blocks_1/moe/,feature_"])
def test_frozen_parameters_are_bit_identical_and_the_rest_train(patterns):
    before, after, metrics = run(frozen_config(patterns))
    mask = trainable.trainable_mask(before.params, patterns)
    flat_mask = jax.tree.leaves(mask)
    assert any(flat_mask) and not all(flat_mask)
    for m, a, b in zip(flat_mask, jax.tree.leaves(before.params), jax.tree.leaves(after.params)):
        if m:
            assert not np.array_equal(a, b)
        else:
            assert a.tobytes() == b.tobytes()  # bitwise, -0.0 included
    assert np.isfinite(metrics["train/grad_norm"]) and metrics["train/grad_norm"] > 0


def test_optimiser_state_exists_only_for_trainable_leaves():
    config = frozen_config("^classifier/")
    state, _ = setup(config)
    state_arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    # AdamW: mu and nu for the class centres only (scalar counters aside).
    centres = state.params["classifier"]["centers"]
    assert [x.shape for x in state_arrays] == [centres.shape, centres.shape]
    everything, _ = setup(frozen_config(".*"))
    num_params = len(jax.tree.leaves(everything.params))
    assert len([x for x in jax.tree.leaves(everything.opt_state) if np.ndim(x) > 0]) == (
        2 * num_params
    )


@pytest.mark.parametrize("update", [False, True])
def test_frozen_batch_norm_statistics_follow_update_batch_stats(update):
    before, after, _ = run(frozen_config("^classifier/", update_batch_stats=update))
    for a, b in zip(jax.tree.leaves(before.batch_stats), jax.tree.leaves(after.batch_stats)):
        assert np.array_equal(a, b) != update
    # A trained BatchNorm layer updates its statistics either way.
    _, after_bn, _ = run(frozen_config("feature_bn2,^classifier/"))
    np.testing.assert_array_equal(
        after_bn.batch_stats["feature_bn1"]["mean"], before.batch_stats["feature_bn1"]["mean"]
    )
    assert not np.array_equal(
        after_bn.batch_stats["feature_bn2"]["mean"], before.batch_stats["feature_bn2"]["mean"]
    )


def test_a_pattern_matching_nothing_is_an_error():
    params = {"encoder": {"a": jnp.zeros(2)}, "classifier": {"centers": jnp.zeros((2, 2))}}
    with pytest.raises(ValueError, match=r"\['lroa'\] match no parameter"):
        trainable.trainable_mask(params, ("lroa", "classifier"))
    with pytest.raises(ValueError, match="not a regex"):
        trainable.parse_patterns("([")
    assert trainable.parse_patterns("a, b") == ("a", "b")


@pytest.mark.parametrize("scope", ["all", "encoder"])
def test_clip_scope(scope):
    """Official recipes clip only the backbone's gradients, never the class centres."""
    config = tiny_config()
    config.optimizer.update(
        name="sgd",
        momentum=0.0,
        weight_decay=0.0,
        learning_rate=1.0,
        end_learning_rate=1.0,
        grad_clip_norm=1.0,
        clip_scope=scope,
    )
    tx, _ = optimizer_lib.build_optimizer(config.optimizer, 10)
    params = {"encoder": {"w": jnp.zeros(4)}, "classifier": {"centers": jnp.zeros(3)}}
    grads = {"encoder": {"w": jnp.full(4, 5.0)}, "classifier": {"centers": jnp.full(3, 20.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    encoder_norm = float(optax.tree.norm(updates["encoder"]))
    centre_norm = float(optax.tree.norm(updates["classifier"]))
    if scope == "encoder":
        np.testing.assert_allclose(encoder_norm, 1.0, rtol=1e-6)  # 10 -> 1
        np.testing.assert_allclose(centre_norm, 20.0 * np.sqrt(3), rtol=1e-6)  # untouched
    else:
        total = np.sqrt(10.0**2 + 20.0**2 * 3)
        np.testing.assert_allclose(encoder_norm, 10.0 / total, rtol=1e-6)
        np.testing.assert_allclose(centre_norm, 20.0 * np.sqrt(3) / total, rtol=1e-6)
    with pytest.raises(ValueError, match="clip_scope='backbone'"):
        config.optimizer.clip_scope = "backbone"
        optimizer_lib.build_optimizer(config.optimizer, 10)
