"""The jitted train step: loss parts add up, the loss falls, a tiny set is memorised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from facemoe_jax.models import build_model
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from facemoe_jax.train import objectives
from facemoe_jax.train import step as step_lib


def tiny_config(num_classes=8, **loss):
    config = common.get_base_config()
    config.model.update(
        image_size=24,
        patch_size=6,
        width=32,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        embed_dim=32,
        num_experts=4,
        top_k=2,
        drop_path_rate=0.0,
    )
    config.loss.update(scale=16.0, m3=0.1, **loss)
    config.optimizer.update(
        learning_rate=3e-3,
        weight_decay=0.0,
        warmup_steps=0,
        decay_power=1.0,
        end_learning_rate=3e-3,
    )
    config.data.num_classes = num_classes
    return config


def setup(config, num_steps=100):
    model = build_model(config.model)
    tx, schedule = optimizer_lib.build_optimizer(config.optimizer, num_steps)
    state = state_lib.create_train_state(model, tx, config)
    step = jax.jit(step_lib.make_train_step(model, config, tx, schedule), donate_argnums=0)
    return model, state, step


def fixed_batch(num_classes=8, per_class=2, size=24, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


def test_total_loss_is_margin_ce_plus_weighted_router_losses():
    config = tiny_config()
    config.loss.update(z_coef=0.5, balance_coef=0.25)
    _, state, step = setup(config)
    _, metrics = step(state, fixed_batch())
    expected = (
        metrics["train/margin_ce"]
        + 0.5 * metrics["train/router_z_loss"]
        + 0.25 * metrics["train/load_balance_loss"]
    )
    np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["train/router_z_loss"], metrics["router/router_z_loss"])
    for key in (
        "router/router_entropy",
        "router/dropped_fraction",
        "router/expert_load_max",
        "train/grad_norm",
        "train/lr",
        "train/accuracy",
    ):
        assert np.isfinite(metrics[key]), key


def test_official_router_losses_are_selected_and_summed_over_blocks():
    config = tiny_config(router_z_loss="official", load_balance_loss="official", aux_reduce="sum")
    _, state, step = setup(config)
    _, metrics = step(state, fixed_batch())
    np.testing.assert_allclose(
        metrics["train/router_z_loss"], metrics["router/official_router_z_loss"]
    )
    np.testing.assert_allclose(
        metrics["train/load_balance_loss"], metrics["router/official_load_balance_loss"]
    )


@pytest.mark.parametrize("margin", ["combined", "adaface"])
def test_train_step_lowers_the_loss_on_a_fixed_batch(margin):
    config = tiny_config(margin=margin)
    _, state, step = setup(config)
    batch = fixed_batch()
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert int(state.step) == 15
    assert losses[-1] < 0.7 * losses[0], losses
    if margin == "adaface":
        assert float(state.aux["margin"]["mean"]) != 20.0  # running norm statistics moved


def test_overfits_a_tiny_set_to_full_train_accuracy():
    config = tiny_config(num_classes=8)
    model, state, step = setup(config, num_steps=200)
    batch = fixed_batch(num_classes=8, per_class=4)
    for _ in range(120):
        state, metrics = step(state, batch)
    assert float(metrics["train/accuracy"]) == 1.0
    # The embeddings in eval mode classify the training images too (nearest class centre).
    emb, _ = model.apply(
        {"params": state.params["encoder"], "batch_stats": state.batch_stats},
        batch["image"].astype(jnp.float32) / 127.5 - 1.0,
    )
    centers = state.params["classifier"]["centers"]
    # Rows past the 8 classes pad the class axis (config.loss.class_rows_multiple): they start
    # at zero and take no part in any softmax, so they never move.
    assert centers.shape[0] == config.loss.class_rows_multiple
    assert float(jnp.max(jnp.abs(centers[8:]))) == 0.0
    centers = centers[:8]
    cos = (emb / jnp.linalg.norm(emb, axis=1, keepdims=True)) @ (
        centers / jnp.linalg.norm(centers, axis=1, keepdims=True)
    ).T
    assert float(jnp.mean(jnp.argmax(cos, 1) == batch["label"])) >= 0.95


def test_partial_fc_step_runs_and_uses_the_step_rng():
    config = tiny_config(num_classes=64, sample_rate=0.3)
    _, state, step = setup(config)
    state, m1 = step(state, fixed_batch(num_classes=16, per_class=1))
    assert np.isfinite(m1["train/loss"])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("margin", "sphere", "config.loss.margin='sphere'"),
        ("router_z_loss", "l2", "config.loss.router_z_loss='l2'"),
        ("load_balance_loss", "gshard", "config.loss.load_balance_loss='gshard'"),
        ("aux_reduce", "max", "config.loss.aux_reduce='max'"),
        ("aux_statistics", "per_host", "config.loss.aux_statistics='per_host'"),
    ],
)
def test_loss_config_errors(field, value, message):
    config = tiny_config()
    config.loss[field] = value
    with pytest.raises(ValueError, match=message):
        objectives.check_config(config)
