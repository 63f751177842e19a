"""FaceEncoder.quality: the quality head's score per image, no label; refused without a head."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax import FaceEncoder, recipes
from facemoe_jax.core.images import normalize_images
from facemoe_jax.models.recognizability import sown_quality
from facemoe_jax.models import build_model
from tests.train.test_step import tiny_config


@functools.cache
def encoder(quality_head: bool):
    config = tiny_config()
    if quality_head:
        recipes.recognizability(config)
    size = config.model.image_size
    model = build_model(config.model)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    return FaceEncoder(config, variables), model, variables


def test_quality_is_the_mean_of_the_head_on_the_image_and_its_mirror():
    enc, model, variables = encoder(quality_head=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    got = enc.quality(images, batch_size=4)  # a padded last batch
    head = jax.jit(
        lambda v, x: sown_quality(
            model.apply(v, x, train=False, mutable=["intermediates"])[1]["intermediates"]
        )
    )
    x = normalize_images(images)
    want = 0.5 * (np.asarray(head(variables, x)) + np.asarray(head(variables, x[:, :, ::-1])))
    assert got.shape == (5,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert enc.quality(images[:0]).shape == (0,)


def test_quality_without_a_head_and_bad_images_are_refused():
    enc, _, _ = encoder(quality_head=False)
    with pytest.raises(ValueError, match="needs a model trained with a quality head"):
        enc.quality(np.zeros((1, 24, 24, 3), np.uint8))
    enc, _, _ = encoder(quality_head=True)
    with pytest.raises(ValueError, match=r"FaceEncoder.quality takes uint8 RGB images"):
        enc.quality(np.zeros((1, 20, 20, 3), np.uint8))
