"""The cross-resolution consistency objective: off by default, its term is 1 - cos between the
model's embedding of the degraded image and its own stop-gradient embedding of the HR image,
and it reaches the parameters only through the degraded branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.core.images import normalize_images
from facemoe_jax.train import objectives
from facemoe_jax.train import step as step_lib
from facemoe_jax.train.objectives.cross_resolution import CrossResolutionObjective
from tests.train.test_step import fixed_batch, setup, tiny_config


def test_off_by_default_and_bad_settings_name_the_field():
    config = tiny_config()
    assert CrossResolutionObjective not in objectives.active(config)
    config.cross_resolution.weight = -1.0
    with pytest.raises(ValueError, match="config.cross_resolution.weight=-1.0 must be >= 0"):
        objectives.check_config(config)
    config.cross_resolution.weight = 0.5
    with pytest.raises(ValueError, match="no degradation is switched on"):
        objectives.check_config(config)
    config.data.acquisition_prob = 1.0
    objectives.check_config(config)


def test_the_term_is_the_cosine_gap_to_the_models_own_hr_embedding():
    config = tiny_config()
    config.model.update(moe_layers="none", depth=1)
    config.data.acquisition_prob = 1.0
    config.cross_resolution.weight = 0.5
    model, state, _ = setup(config)
    batch = fixed_batch()
    batch["image_hr"] = jnp.asarray(np.asarray(batch["image"])[:, ::-1])  # another image
    active = objectives.build(config)
    assert [o.name for o in active] == ["margin", "router", "cross_resolution"]
    loss_fn = step_lib.make_loss_fn(model, config, active)
    ctx = objectives.StepContext(model, config, ())

    def total(params, state, batch):
        prepared, batch = step_lib.prepare(active, ctx, state, batch, {})
        return loss_fn(params, prepared, batch)

    (loss, (_, _, metrics)), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(
        state.params, state, batch
    )
    variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    rng = jax.random.fold_in(state.rng, state.step)
    dropout_rng, _ = jax.random.split(rng)
    low = model.apply(
        variables,
        normalize_images(batch["image"]),
        train=True,
        rngs={"dropout": dropout_rng},
        mutable=["batch_stats"],
    )[0][0]
    high = model.apply(variables, normalize_images(batch["image_hr"]), train=False)[0]
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    cosine = np.sum(low * high, 1) / np.linalg.norm(low, axis=1) / np.linalg.norm(high, axis=1)
    np.testing.assert_allclose(metrics["train/cross_resolution"], np.mean(1 - cosine), rtol=1e-5)
    # A dense model: the router term is 0.
    np.testing.assert_allclose(
        loss, metrics["train/margin_ce"] + 0.5 * np.mean(1 - cosine), rtol=1e-5
    )

    # Alone, the term's gradient is that of 0.5 (1 - cos(f(LR), c)) with c = f(HR) a constant:
    # nothing flows through the HR branch.
    alone = [CrossResolutionObjective(config)]
    alone_loss = step_lib.make_loss_fn(model, config, alone)

    def term(params):
        prepared, prepared_batch = step_lib.prepare(alone, ctx, state, batch, {})
        return alone_loss(params, prepared, prepared_batch)[0]

    def reference(encoder_params):
        emb = model.apply(
            {"params": encoder_params, "batch_stats": state.batch_stats},
            normalize_images(batch["image"]),
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
        )[0][0]
        unit = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
        target = jnp.asarray(high / np.linalg.norm(high, axis=1, keepdims=True), jnp.float32)
        return 0.5 * jnp.mean(1.0 - jnp.sum(unit * target, axis=1))

    got = jax.jit(jax.grad(term))(state.params)["encoder"]
    want = jax.jit(jax.grad(reference))(state.params["encoder"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(got))
