"""Test-time BatchNorm adaptation against Flax's own training-mode BatchNorm.

The reference is independent of our interceptor: a training-mode forward of the same model
(every BatchNorm on batch statistics, dropout rate 0; ours runs with rate 0.5 in eval mode) gives the per-batch outputs, and its running
statistics update new = m * old + (1 - m) * batch, solved for `batch`, gives each layer's batch
statistics.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from facemoe_jax.core import defaults
from facemoe_jax.encoder import FaceEncoder
from facemoe_jax.train import adapt_bn

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
MOMENTUM = 0.9


class TinyCNN(nn.Module):
    """conv -> BatchNorm2d -> PReLU-like -> dropout -> dense -> BatchNorm1d without scale, the
    layer kinds of the IResNet (whose compile alone would cost this file's time budget)."""

    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool):
        bn = dict(use_running_average=not train, momentum=MOMENTUM, epsilon=1e-5)
        x = nn.Conv(6, (3, 3), strides=2)(x)
        x = nn.BatchNorm(**bn)(x)
        x = jnp.where(x > 0, x, 0.25 * x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(5)(x.reshape(x.shape[0], -1))
        return nn.BatchNorm(use_scale=False, **bn)(x), {}


@pytest.fixture(scope="module")
def cnn():
    model = TinyCNN()
    variables = dict(
        jax.jit(lambda k, x: model.init(k, x, train=False))(
            jax.random.key(0), jnp.zeros((2, 8, 8, 3))
        )
    )
    # Running statistics unlike any batch's, and a non-trivial scale and bias.
    variables["batch_stats"] = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])
    variables["params"] = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), variables["params"]
    )
    return model, variables


def train_mode(variables, images):
    """Flax's training-mode forward without dropout: (outputs, batch statistics per layer)."""
    x = (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5
    (out, _), mutated = TinyCNN(dropout=0.0).apply(
        variables, x, train=True, mutable=["batch_stats"]
    )
    m = MOMENTUM
    batch = jax.tree.map(
        lambda new, old: (new - m * old) / (1 - m), mutated["batch_stats"], variables["batch_stats"]
    )
    return np.asarray(out), batch


def assert_trees_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_per_batch_mode_is_training_mode_batch_norm_without_dropout(cnn):
    model, variables = cnn
    adaptation = adapt_bn.BatchNormAdaptation(model, "per_batch", flip_test=False)
    ours = adaptation.embed_per_batch(variables, IMAGES, batch_size=5)
    expected = np.concatenate(
        [train_mode(variables, IMAGES[:5])[0], train_mode(variables, IMAGES[5:])[0]]
    )
    np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=2e-4)


def test_cumulative_statistics_average_the_batches_and_leave_every_parameter(cnn):
    model, variables = cnn
    adaptation = adapt_bn.BatchNormAdaptation(model, "cumulative", num_batches=8)
    # 10 images in batches of 4: 4 + 4 + 2 (the last batch padded, its padding weighted 0).
    adapted = adaptation.adapted_variables(variables, IMAGES, batch_size=4)
    stats = [train_mode(variables, IMAGES[i : i + 4])[1] for i in (0, 4, 8)]
    expected = jax.tree.map(lambda a, b, c: (4 * a + 4 * b + 2 * c) / 10, *stats)
    assert_trees_close(adapted["batch_stats"], expected, rtol=1e-4, atol=1e-5)
    # Every parameter bit-identical; every statistic changed.
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        adapted["params"],
        variables["params"],
    )
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), adapted["batch_stats"], variables["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))
    # num_batches bounds the images used: 1 batch = the first 4 images only.
    first = adaptation.adapted_variables(variables, IMAGES, batch_size=4, num_batches=1)
    assert_trees_close(first["batch_stats"], stats[0], rtol=1e-4, atol=1e-5)


def test_vit_adapts_only_its_head_batch_norms(tiny_model):
    config, model, variables = tiny_model
    images = RNG.integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
    adapted = adapt_bn.BatchNormAdaptation(model).adapted_variables(variables, images, 3)
    assert sorted(adapted["batch_stats"]) == ["feature_bn1", "feature_bn2"]
    assert adapted["params"] is variables["params"]
    assert not np.allclose(
        adapted["batch_stats"]["feature_bn2"]["var"], variables["batch_stats"]["feature_bn2"]["var"]
    )


def test_face_encoder_adapt_returns_a_new_encoder(tiny_model):
    config, model, variables = tiny_model
    images = RNG.integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
    encoder = FaceEncoder(config, variables)
    before = encoder.embed(images, flip_test=False)
    adapted = encoder.adapt(images, batch_size=4)
    np.testing.assert_array_equal(encoder.embed(images, flip_test=False), before)  # unchanged
    adaptation = adapt_bn.BatchNormAdaptation(model)
    expected = adaptation.adapted_variables(variables, images, 4, num_batches=0)["batch_stats"]
    assert_trees_close(adapted.variables["batch_stats"], expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(adapted.embed(images, flip_test=False), before, atol=1e-3)

    online = encoder.adapt(mode="per_batch")
    raw = online.embed(images, flip_test=True, normalize=False, batch_size=4)
    np.testing.assert_allclose(raw, adaptation.embed_per_batch(variables, images, 4), rtol=1e-6)


def test_config_errors_name_the_field():
    def eval_config(**fields):
        ev = defaults.get_base_config().eval
        ev.update(fields)
        return ev

    adapt_bn.check_config(eval_config())
    with pytest.raises(ValueError, match="config.eval.adapt_bn='sometimes'"):
        adapt_bn.check_config(eval_config(adapt_bn="sometimes"))
    with pytest.raises(ValueError, match="config.eval.adapt_bn_batches=0"):
        adapt_bn.check_config(eval_config(adapt_bn="cumulative", adapt_bn_batches=0))


def test_suite_adapts_each_embedded_set_on_its_own_images(tiny_model, tmp_path):
    from facemoe_jax.data import synthetic
    from facemoe_jax.evaluate import embed, suite, verification
    from tests.evaluate.test_suite import RecordingWriter

    config, model, variables = tiny_model
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.update(
        synthetic_pairs=20,
        low_resolution_sets="",
        routing_map_faces=0,
        synthetic_tinyface_identities=0,
        batch_size=20,
        adapt_bn="cumulative",
        adapt_bn_batches=1,
    )
    results = suite.run_evaluations(model, variables, config, str(tmp_path), 1, RecordingWriter())
    images_a, images_b, issame = synthetic.verification_pairs(
        num_pairs=20, image_size=48, seed=config.seed
    )
    adaptation, embed_fn = adapt_bn.BatchNormAdaptation(model), embed.make_embed_fn(model)
    a, b = (
        embed.embed_images(embed_fn, adaptation.adapted_variables(variables, x, 20), x, 20)
        for x in (images_a, images_b)
    )
    expected = verification.verification_metrics(a, b, issame)
    assert results["synthetic"]["accuracy"] == expected["accuracy"]
    assert results["synthetic"]["best_threshold"] == expected["best_threshold"]
