"""The recognizability heads: off = no parameters; on = the same embedding at initialisation
(uniform attention), weights sown per position, one quality score per image in (0, 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.losses.recognizability import sown_quality
from facemoe_jax.models import build_model
from facemoe_jax.models.recognizability import ATTENTION_NAME
from tests.models.test_mobilefacenet import mbf_config
from tests.train.test_step import tiny_config


def vit_config(**overrides):
    cfg = tiny_config().model
    cfg.update(**overrides)
    return cfg


def mbf_tiny(**overrides):
    return mbf_config(image_size=16, embed_dim=16, mobilefacenet_blocks=(1, 1, 1, 1),
                      mobilefacenet_scale=1, **overrides)  # fmt: skip


# A token encoder and a feature-map one: the four encoders share `attend` / `estimate_quality`
# (models/recognizability.py), so two cover the two ways of calling them and keep this fast.
CONFIGS = {"vit": (vit_config, 16), "mobilefacenet": (mbf_tiny, 1)}  # positions of the tokens / map


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_heads_off_add_nothing_and_on_start_as_the_plain_encoder(name):
    make, positions = CONFIGS[name]
    plain_cfg, heads_cfg = make(), make(perceptibility_attention=True, quality_head=True)
    size = plain_cfg.image_size
    images = jax.random.uniform(jax.random.PRNGKey(1), (3, size, size, 3), minval=-1, maxval=1)
    plain, heads = build_model(plain_cfg), build_model(heads_cfg)
    plain_vars = jax.jit(plain.init)(jax.random.PRNGKey(0), images)
    heads_vars = jax.jit(heads.init)(jax.random.PRNGKey(0), images)
    new = set(heads_vars["params"]) - set(plain_vars["params"])
    assert new == {ATTENTION_NAME, "quality_head"}
    # The plain encoder's parameters, with the heads' own added, give the plain embedding: the
    # attention starts uniform (its score layer is zero), so every token keeps scale 1.
    merged = {"params": {**plain_vars["params"], **{k: heads_vars["params"][k] for k in new}},
              "batch_stats": plain_vars.get("batch_stats", {})}  # fmt: skip
    want = jax.jit(plain.apply)(plain_vars, images)[0]
    got, state = jax.jit(lambda v, x: heads.apply(v, x, mutable=["intermediates"]))(merged, images)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want), rtol=1e-5, atol=1e-5)
    weights = state["intermediates"][ATTENTION_NAME]["weights"][0]
    assert weights.shape[0] == 3 and weights.shape[1] == positions
    np.testing.assert_allclose(np.asarray(weights.sum(axis=1)), 1.0, rtol=1e-6)
    quality = sown_quality(state["intermediates"])
    assert quality.shape == (3,) and bool(jnp.all((quality >= 0) & (quality <= 1)))


def test_no_intermediates_and_same_parameters_when_heads_are_off():
    cfg = vit_config()
    images = jnp.zeros((2, cfg.image_size, cfg.image_size, 3))
    variables = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), images)
    cfg.update(perceptibility_attention=False, quality_head=False)
    model = build_model(cfg)
    same = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    assert jax.tree.structure(same) == jax.tree.structure(variables)
    _, state = jax.eval_shape(lambda v: model.apply(v, images, mutable=["intermediates"]), same)
    assert "quality" not in state.get("intermediates", {})
