"""The recognizability heads: off = no parameters; on = the same embedding at initialisation
(uniform attention), weights sown per position, one quality score per image in (0, 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.models.recognizability import sown_quality
from facemoe_jax.models import build_model
from facemoe_jax.models.recognizability import (
    ATTENTION_NAME,
    PATCH_KEY,
    QUALITY_KEY,
    down_up,
)
from tests.models.test_iresnet import iresnet_config
from tests.models.test_mobilefacenet import mbf_config
from tests.train.test_step import tiny_config


def vit_config(**overrides):
    cfg = tiny_config().model
    cfg.update(**overrides)
    return cfg


def mbf_tiny(**overrides):
    # MobileFaceNet's first layer is not linear: its quality head reads the stem's statistics.
    overrides.setdefault("quality_head_input", "patch+embedding")
    return mbf_config(
        image_size=16,
        embed_dim=16,
        mobilefacenet_blocks=(1, 1, 1, 1),
        mobilefacenet_scale=1,
        **overrides,
    )


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
    merged = {
        "params": {**plain_vars["params"], **{k: heads_vars["params"][k] for k in new}},
        "batch_stats": plain_vars.get("batch_stats", {}),
    }
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
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, images)
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


def _down_up(images, k):
    """numpy reference: every k x k block (whole blocks only) replaced by its mean."""
    out = images.copy()
    for i in range(0, images.shape[1] - k + 1, k):
        for j in range(0, images.shape[2] - k + 1, k):
            out[:, i : i + k, j : j + k] = images[:, i : i + k, j : j + k].mean(
                axis=(1, 2), keepdims=True
            )
    return out


def test_down_up_averages_whole_blocks_and_keeps_the_remainder():
    images = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    for k in (2, 4):
        np.testing.assert_allclose(
            np.asarray(down_up(jnp.asarray(images), k)), _down_up(images, k), rtol=1e-6, atol=1e-6
        )


def test_multiscale_statistics_are_log_detail_ratios_of_the_patch_embedding():
    cfg = vit_config(quality_head=True, quality_head_input="multiscale")
    model = build_model(cfg)
    size, p = cfg.image_size, cfg.patch_size
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (2, size, size, 3), minval=-1))
    images = images * np.array([1.0, 0.5, 2.0], np.float32)  # channels of different contrast
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, images)
    got = np.asarray(state["intermediates"][PATCH_KEY][0])
    kernel = np.asarray(variables["params"]["patch_embed"]["kernel"]).reshape(-1, cfg.width)
    g = size // p

    def tokens(x):  # bias-free: the bias cancels in the detail and not in a std
        return (
            x.reshape(2, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, g * g, -1) @ kernel
        )

    spread = tokens(images).std(axis=1)
    want = [
        np.log(np.sqrt((tokens(images - _down_up(images, k)) ** 2).mean(axis=1)) + 1e-6)
        - np.log(spread + 1e-6)
        for k in (2, 4)
    ]
    want = np.concatenate([*want, np.log(spread + 1e-6)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # A detail ratio does not change when the image's contrast does (the log spread does).
    _, scaled = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
        variables, 3.0 * images
    )
    scaled = np.asarray(scaled["intermediates"][PATCH_KEY][0])
    np.testing.assert_allclose(scaled[:, : 2 * cfg.width], got[:, : 2 * cfg.width], atol=1e-4)
    np.testing.assert_allclose(
        scaled[:, 2 * cfg.width :], got[:, 2 * cfg.width :] + np.log(3.0), atol=1e-4
    )
    # The log-ratios go to the head as they are: no LayerNorm, which would remove their mean.
    assert set(variables["params"]["quality_head"]) == {"fc1", "fc2"}


def test_a_multiscale_head_on_an_encoder_without_a_linear_first_layer_is_refused():
    cfg = mbf_tiny(quality_head=True, quality_head_input="multiscale+embedding")
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    with pytest.raises(ValueError, match="quality_head_input='multiscale\\+embedding'"):
        jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), images)


@pytest.mark.parametrize(
    "head_input, parts, inputs, stem_inputs",
    [
        ("embedding", {"fc1", "fc2"}, 32, 32),
        (
            "patch+embedding",
            {"patch_norm", "embedding_norm", "fc1", "fc2"},
            2 * 32 + 32,
            2 * 64 + 32,
        ),
        ("multiscale+embedding", {"embedding_norm", "fc1", "fc2"}, 3 * 32 + 32, 3 * 64 + 32),
        (
            "multiscale+embedding+norm",
            {"embedding_norm", "fc1", "fc2"},
            3 * 32 + 32 + 1,
            3 * 64 + 32 + 1,
        ),
    ],
)
def test_quality_head_inputs_and_the_iresnet_head(head_input, parts, inputs, stem_inputs):
    # "embedding" is the first version's head: the same parameters as before the option existed.
    cfg = vit_config(quality_head=True, quality_head_input=head_input)
    images = jnp.zeros((2, cfg.image_size, cfg.image_size, 3))
    variables = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), images)
    head = variables["params"]["quality_head"]
    assert set(head) == parts and head["fc1"]["kernel"].shape[0] == inputs
    # IResNet: the stem's 64 channels give the statistics; one score per image.
    cfg = iresnet_config(
        quality_head=True, perceptibility_attention=True, quality_head_input=head_input
    )
    model = build_model(cfg)
    images = jnp.zeros((2, cfg.image_size, cfg.image_size, 3))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    _, state = jax.eval_shape(
        lambda v: model.apply(v, images, mutable=["intermediates"]), variables
    )
    assert state["intermediates"][QUALITY_KEY][0].shape == (2,)
    assert variables["params"]["quality_head"]["fc1"]["kernel"].shape[0] == stem_inputs


def test_the_norm_input_is_the_scaled_log_norm_of_the_embedding():
    """The "+norm" head reads log(|e|) * quality_head_norm_scale as its last input (which the
    LayerNorm of the embedding would otherwise take away): the head's score equals the same
    Dense layers applied by hand."""
    from facemoe_jax.models.recognizability import QualityHead

    rng = np.random.default_rng(0)
    e = jnp.asarray(rng.normal(size=(3, 8)) * [[1.0], [2.0], [5.0]], jnp.float32)
    patch = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    head = QualityHead(4, 0.0, "multiscale+embedding+norm", 3.0)
    params = head.init(jax.random.PRNGKey(1), e, False, patch)["params"]
    unit_scale = (e - e.mean(1, keepdims=True)) / jnp.sqrt(e.var(1, keepdims=True) + 1e-6)
    x = np.concatenate(
        [
            np.asarray(patch),
            np.asarray(unit_scale) * np.asarray(params["embedding_norm"]["scale"])
            + np.asarray(params["embedding_norm"]["bias"]),
            3.0 * np.log(np.linalg.norm(np.asarray(e), axis=1, keepdims=True)),
        ],
        axis=1,
    )
    h = np.maximum(x @ params["fc1"]["kernel"] + params["fc1"]["bias"], 0)
    want = 1 / (1 + np.exp(-(h @ params["fc2"]["kernel"] + params["fc2"]["bias"])[:, 0]))
    np.testing.assert_allclose(
        np.asarray(head.apply({"params": params}, e, False, patch)), want, rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="quality_head_norm_scale=0"):
        build_model(vit_config(quality_head=True, quality_head_norm_scale=0.0))


def test_an_unknown_quality_head_input_is_refused():
    with pytest.raises(ValueError, match="quality_head_input='pixels'"):
        build_model(vit_config(quality_head=True, quality_head_input="pixels"))
