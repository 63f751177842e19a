"""The recognizability heads: off = no parameters; on = the same embedding at initialisation
(uniform attention), weights sown per position, one quality score per image in (0, 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.losses.recognizability import sown_quality
from facemoe_jax.models import build_model
from facemoe_jax.models.recognizability import ATTENTION_NAME, PATCH_KEY, QUALITY_KEY
from tests.models.test_iresnet import iresnet_config
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


def test_patch_statistics_are_the_mean_and_std_of_the_patch_tokens():
    cfg = vit_config(quality_head=True, quality_head_input="patch")
    model = build_model(cfg)
    size, p = cfg.image_size, cfg.patch_size
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (2, size, size, 3), minval=-1))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables,
                                                                                 images)  # fmt: skip
    got = np.asarray(state["intermediates"][PATCH_KEY][0])
    # numpy: each non-overlapping p x p patch times the patch embedding's kernel, plus its bias.
    conv = variables["params"]["patch_embed"]
    g = size // p
    patches = images.reshape(2, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, g * g, -1)
    tokens = patches @ np.asarray(conv["kernel"]).reshape(-1, cfg.width) + np.asarray(conv["bias"])
    want = np.concatenate([tokens.mean(axis=1), tokens.std(axis=1)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The head normalises the statistics alone: no embedding part, unlike "patch+embedding".
    assert set(variables["params"]["quality_head"]) == {"patch_norm", "fc1", "fc2"}
    assert variables["params"]["quality_head"]["fc1"]["kernel"].shape[0] == 2 * cfg.width


@pytest.mark.parametrize(
    "head_input, parts, inputs",
    [
        ("embedding", {"fc1", "fc2"}, 32),
        ("patch+embedding", {"patch_norm", "embedding_norm", "fc1", "fc2"}, 2 * 32 + 32),
    ],
)
def test_quality_head_inputs_and_the_iresnet_head(head_input, parts, inputs):
    # "embedding" is the first version's head: the same parameters as before the option existed.
    cfg = vit_config(quality_head=True, quality_head_input=head_input)
    images = jnp.zeros((2, cfg.image_size, cfg.image_size, 3))
    variables = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), images)
    head = variables["params"]["quality_head"]
    assert set(head) == parts and head["fc1"]["kernel"].shape[0] == inputs
    # IResNet: the stem's 64 channels give the statistics; one score per image.
    cfg = iresnet_config(quality_head=True, perceptibility_attention=True,
                         quality_head_input=head_input)  # fmt: skip
    model = build_model(cfg)
    images = jnp.zeros((2, cfg.image_size, cfg.image_size, 3))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    _, state = jax.eval_shape(lambda v: model.apply(v, images, mutable=["intermediates"]),
                              variables)  # fmt: skip
    assert state["intermediates"][QUALITY_KEY][0].shape == (2,)
    want = 2 * 64 + 32 if head_input == "patch+embedding" else 32
    assert variables["params"]["quality_head"]["fc1"]["kernel"].shape[0] == want


def test_an_unknown_quality_head_input_is_refused():
    with pytest.raises(ValueError, match="quality_head_input='pixels'"):
        build_model(vit_config(quality_head=True, quality_head_input="pixels"))
