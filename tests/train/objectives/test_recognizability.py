"""The recognizability and quality objectives in the train step: the loss parts add up, c_UI
moves as the documented EMA of the batch's degraded copies, the quality head learns from the
copies' stop-gradient embeddings only, and a state restored from a checkpoint continues bitwise
(the loop's resume itself is tested by tests/test_main.py; what these objectives add is c_UI
and the class means of the "agreement" target in TrainState.aux)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from facemoe_jax import recipes
from facemoe_jax.core.images import normalize_images
from facemoe_jax.losses import class_means
from facemoe_jax.losses import recognizability as ri
from facemoe_jax.train import objectives
from facemoe_jax.train.objectives import quality
from facemoe_jax.train.objectives.quality import COPIES, QualityObjective
from facemoe_jax.train.checkpoint import Checkpointer, config_changes
from tests.train.test_step import fixed_batch, setup, tiny_config


def paired(batch):
    """The batch as the loop's paired mode gives it: the quality copies come from "image_hr"."""
    return {**batch, "image_hr": batch["image"][::-1]}


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow
def test_step_moves_the_centre_adds_the_losses_and_resumes_bitwise(tmp_path):
    config = tiny_config()
    recipes.recognizability(config)
    config.recognizability.update(ui_images=8, quality_images=12)
    # RI never looks inside the blocks: compile less.
    config.model.update(moe_layers="none", depth=1)
    model, state, step = setup(config)
    centre = state.aux["recognizability"]["centre"]
    assert centre.shape == (32,) and not np.any(np.asarray(centre))
    rows = state.params["classifier"]["centers"].shape[0]
    per_class = state.aux["quality"]["per_class"]
    assert per_class["mean"].shape == (rows, 32) and per_class["count"].shape == (rows,)
    # The "agreement" target (the default): classes 0..3 have images in their means already,
    # the others none (their copies carry no target yet).
    known = np.arange(rows) < 4
    noise = np.random.default_rng(0).normal(size=(rows, 32))
    prior = {
        "mean": jnp.asarray(noise * 0.05 * known[:, None], jnp.float32),
        "count": jnp.asarray(known * 3.0, jnp.float32),
    }
    state = state.replace(aux={**state.aux, "quality": {"per_class": prior}})
    prior_kept = jax.tree.map(np.array, prior)  # the step donates the state's buffers
    batch = paired(fixed_batch())
    # c starts at 0, so after one step it is the mean direction of the embeddings of the first 8
    # images degraded to 4 px with the step's noise, embedded on their own in evaluation mode.
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, 0), 0x5249)
    degraded = ri.degrade_beyond_recognition(
        normalize_images(batch["image"][:8]), rng, 4, config.recognizability.ui_noise_std
    )
    ctx = objectives.StepContext(model, config, ())
    quality_objective = QualityObjective(config)

    @jax.jit  # one compilation for the references
    def references(state, batch, degraded):
        variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
        copies = quality_objective.prepare(ctx, state, batch, None)[1][COPIES]

        def quality_loss(encoder_params):
            return quality.predict_quality(
                model,
                encoder_params,
                copies["embeddings"],
                jax.random.PRNGKey(0),
                copies["patch"],
            ).sum()

        grads = jax.grad(quality_loss)(state.params["encoder"])
        # The copies come from the clean images; each one's full-size embedding is its target's
        # resolution reference and enters its class's mean after the lookup.
        clean = model.apply(variables, normalize_images(batch["image_hr"][:12]))[0]
        return model.apply(variables, degraded)[0], copies, grads, clean

    ui, copies, grads, clean = references(state, batch, degraded)
    expected = unit(unit(np.asarray(ui)).mean(axis=0))
    # The quality loss is computed over the 12 copies and reaches the head, nothing else.
    assert copies["embeddings"].shape == (12, 32)
    close = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(copies["reference"]), np.asarray(clean), **close)
    # Image i is in group i mod 6 (the sizes below 24 px: 4, 6, 8, 12, 16, then full size):
    # the full-size copies (5, 11) are their own reference.
    full = [i for i in range(12) if i % 6 == 5]
    embeddings = np.asarray(copies["embeddings"])
    np.testing.assert_allclose(embeddings[full], np.asarray(clean)[full], **close)
    # the default head input: two detail ratios and the log spread of 32 channels
    assert copies["patch"].shape == (12, 3 * 32)
    labels = np.asarray(batch["label"][:12])
    agreement = np.sum(unit(embeddings) * prior_kept["mean"][labels], axis=1)
    np.testing.assert_allclose(np.asarray(copies["agreement"]), agreement, atol=1e-5)
    counts = np.asarray(copies["agreement_count"])
    np.testing.assert_array_equal(counts, 3.0 * (labels < 4))
    assert 0 < (labels < 4).sum() < 12  # both kinds of copies are in the batch
    touched = {
        name for name, g in grads.items() if any(np.any(np.asarray(x)) for x in jax.tree.leaves(g))
    }
    assert touched == {"quality_head"}

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    state, metrics = step(state, batch)
    np.testing.assert_allclose(
        np.asarray(state.aux["recognizability"]["centre"]), expected, atol=1e-5
    )
    entered = class_means.update(prior_kept, clean, labels, 8, class_axes=())
    for key in ("mean", "count"):
        value = np.asarray(state.aux["quality"]["per_class"][key])
        np.testing.assert_allclose(value, np.asarray(entered[key]), atol=1e-4)
    assert float(metrics["ri/agreement_known_share"]) == pytest.approx((labels < 4).mean())
    # Weights 1 and 1; router losses off (recipe).
    parts = metrics["train/margin_ce"] + metrics["ri/diversion_loss"] + metrics["ri/quality_loss"]
    np.testing.assert_allclose(metrics["train/loss"], parts, rtol=1e-6)
    assert 0.0 <= float(metrics["ri/mean"]) <= 1.0

    # Saved after step 1 and restored, the state takes step 2 exactly as the live one does.
    checkpointer = Checkpointer(str(tmp_path), every_steps=1, max_to_keep=1)
    checkpointer.save(1, state, None, config)
    checkpointer.manager.wait_until_finished()
    restored = checkpointer.restore(1, abstract)
    jax.tree.map(np.testing.assert_array_equal, restored.aux, state.aux)
    second = paired(fixed_batch(seed=1))
    live, live_metrics = step(state, second)
    again, again_metrics = step(restored, second)
    jax.tree.map(np.testing.assert_array_equal, again.aux, live.aux)
    for key in ("train/loss", "ri/quality_loss", "ri/cos_to_ui_centre"):
        assert float(again_metrics[key]) == float(live_metrics[key]), key


def test_turning_ri_on_over_a_checkpoint_without_it_is_refused():
    saved = {"model": {"name": "vit_moe"}, "recognizability": {"enabled": False}}
    old = {"model": {"name": "vit_moe"}}  # written before the switches existed
    for before in (saved, old):
        fixed, _ = config_changes(
            before,
            {
                "model": {"name": "vit_moe", "quality_head": True},
                "recognizability": {"enabled": True},
            },
        )
        assert fixed == [
            "model.quality_head (checkpoint False, now True)",
            "recognizability.enabled (checkpoint False, now True)",
        ]
    assert config_changes(old, {"model": {"name": "vit_moe", "quality_head": False}}) == ([], [])


def test_a_quality_head_of_another_input_is_refused_and_irrelevant_without_a_head():
    now = {
        "model": {"name": "vit_moe", "quality_head": True, "quality_head_input": "patch+embedding"}
    }
    # Written before the option existed: its head read the embedding alone.
    old_head = {"model": {"name": "vit_moe", "quality_head": True}}
    fixed, _ = config_changes(old_head, now)
    assert fixed == ["model.quality_head_input (checkpoint 'embedding', now 'patch+embedding')"]
    # The detail statistics' head (the default now) over a patch-statistics one's checkpoint.
    detail = {
        "model": {
            "name": "vit_moe",
            "quality_head": True,
            "quality_head_input": "multiscale+embedding",
        }
    }
    fixed, _ = config_changes(now, detail)
    assert fixed == [
        "model.quality_head_input (checkpoint 'patch+embedding', now 'multiscale+embedding')"
    ]
    # Without a head on either side the input is not part of the state: nothing to refuse.
    no_head = {"model": {"name": "vit_moe", "quality_head": False}}
    without = {
        "model": {"name": "vit_moe", "quality_head": False, "quality_head_input": "patch+embedding"}
    }
    assert config_changes(no_head, without) == ([], [])
    assert config_changes({"model": {"name": "vit_moe"}}, without) == ([], [])


def test_switching_to_the_agreement_target_over_a_checkpoint_is_refused():
    """The "agreement" target keeps class means in the state: a checkpoint trained with another
    target (or written before the option) has none."""
    head = {"name": "vit_moe", "quality_head": True}
    own_full = {"model": head, "recognizability": {"quality_target": "own_full"}}
    before = {"model": head, "recognizability": {}}
    agreement = {"model": head, "recognizability": {"quality_target": "agreement"}}
    # Before the option the target was the class prototype (core/defaults.BEFORE_ADDED).
    for saved, was in ((own_full, "own_full"), (before, "prototype")):
        fixed, _ = config_changes(saved, agreement)
        assert fixed == [f"recognizability.quality_target (checkpoint {was!r}, now 'agreement')"]
    no_head = {"name": "vit_moe", "quality_head": False}
    assert config_changes(
        {"model": no_head, "recognizability": {"quality_target": "own_full"}},
        {"model": no_head, "recognizability": {"quality_target": "agreement"}},
    ) == ([], [])


def test_a_checkpoint_without_an_aux_entry_restores_unless_the_run_needs_it(tmp_path):
    """A state saved without an objective's aux entry restores into a run that does not use
    it, through the Checkpointer (resume) and restore_params (init_from, FaceEncoder); a run
    that needs an entry the checkpoint lacks is told which."""
    from facemoe_jax.train.checkpoint import CheckpointError, restore_params

    config = tiny_config()
    config.model.update(moe_layers="none", depth=1)
    model, state, _ = setup(config)
    assert set(state.aux) == {"margin"}
    kept = jax.tree.map(np.array, state)
    checkpointer = Checkpointer(str(tmp_path), every_steps=1, max_to_keep=1)
    checkpointer.save(3, state, None, config)
    checkpointer.manager.wait_until_finished()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = checkpointer.restore(3, abstract)
    centres = kept.params["classifier"]["centers"]
    np.testing.assert_array_equal(np.asarray(restored.params["classifier"]["centers"]), centres)
    _, params, _, step = restore_params(str(tmp_path))
    assert step == 3 and params["classifier"]["centers"].shape == centres.shape
    centre = jax.ShapeDtypeStruct((32,), jnp.float32)
    with_ri = abstract.replace(aux={**abstract.aux, "recognizability": {"centre": centre}})
    with pytest.raises(CheckpointError, match="has no aux/recognizability"):
        checkpointer.restore(3, with_ri)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ui_pixels", 0, "ui_pixels=0"),
        ("centre_momentum", 1.0, "centre_momentum=1.0"),
        ("diversion_weighting", "hard", "diversion_weighting='hard'"),
        ("margin_angle_scale", 0.0, "margin_angle_scale=0.0"),
        ("quality_pixels", "4,x", "quality_pixels='4,x'"),
        ("quality_images", 1000, "quality_images=1000"),
        ("quality_source", "raw", "quality_source='raw'"),
        ("quality_target", "centre", "quality_target='centre'"),
        ("quality_angle_power", 0.0, "quality_angle_power=0.0"),
        ("quality_ui_weight", 1.5, "quality_ui_weight=1.5"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    config = common.get_base_config()
    config.recognizability.update(enabled=True, **{field: value})
    with pytest.raises(ValueError, match=message):
        objectives.check_config(config)


def test_a_quality_head_without_ri_is_refused():
    config = common.get_base_config()
    config.model.quality_head = True
    with pytest.raises(ValueError, match="quality_head=True needs config.recognizability"):
        objectives.check_config(config)
