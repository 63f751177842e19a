"""MobileFaceNet (insightface arcface_torch mbf / mbf_large) in Flax: layout, sizes, precision.

Weight parity with the official state_dicts is in tests/interop/test_convert_cnn.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from facemoe_jax.models import build_model
from facemoe_jax.models.mobilefacenet import output_side
from tests.models.test_iresnet import abstract


def mbf_config(**overrides):
    cfg = common.get_base_config().model
    cfg.update(name="mobilefacenet", image_size=112, embed_dim=512)
    cfg.update(**overrides)
    return cfg


@pytest.mark.parametrize(
    "blocks, scale, official",
    [((1, 4, 6, 2), 2, 2059520), ((2, 8, 12, 4), 4, 6314880)],
    ids=["mbf", "mbf_large"],
)
def test_parameter_count_is_the_official(blocks, scale, official):
    cfg = mbf_config(mobilefacenet_blocks=blocks, mobilefacenet_scale=scale)
    variables = abstract(cfg)
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == official
    params = variables["params"]
    # the GDC head: a 7x7 depthwise conv over the last map at 112 px, then Dense + BatchNorm1d
    assert params["features"]["layers_0"]["layers_0"]["kernel"].shape == (7, 7, 1, 512)
    assert params["features"]["layers_2"]["kernel"].shape == (512, 512)
    assert params["conv_sep"]["layers_0"]["kernel"].shape == (1, 1, 128 * scale, 512)
    if blocks[0] == 1:  # a grouped 3x3 ConvBlock with 64 groups
        assert params["layers_1"]["layers_0"]["kernel"].shape == (3, 3, scale, 64 * scale)
    else:  # a Residual of DepthWise blocks with 128 hidden channels
        assert len(params["layers_1"]) == blocks[0]
        depthwise = params["layers_1"]["layers_0"]["layers_1"]["layers_0"]
        assert depthwise["kernel"].shape == (3, 3, 1, 128)
    assert len(params["layers_5"]) == blocks[2]


def test_output_side_and_small_inputs():
    assert output_side(112) == 7 and output_side(97) == 7 and output_side(32) == 2
    cfg = mbf_config(image_size=32, embed_dim=64)
    model = build_model(cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    emb, aux = jax.jit(model.apply)(variables, x)
    assert emb.shape == (3, 64) and emb.dtype == jnp.float32 and aux == {}
    with pytest.raises(ValueError, match="image_size"):
        model.apply(variables, jnp.zeros((1, 48, 48, 3)))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mobilefacenet_blocks", (1, 2, 3), "config.model.mobilefacenet_blocks"),
        ("mobilefacenet_blocks", (1, 0, 1, 1), "config.model.mobilefacenet_blocks"),
        ("mobilefacenet_scale", 0, "config.model.mobilefacenet_scale=0"),
        ("dtype", "float16", "config.model.dtype='float16'"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        build_model(mbf_config(**{field: value}))


def test_bfloat16_layers_with_float32_head_and_statistics():
    cfg = mbf_config(image_size=32, embed_dim=64, dtype="bfloat16")
    model = build_model(cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)

    @jax.jit
    def run(v):
        return model.apply(
            v,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name in ("layers_7", "conv_sep"),
        )

    (emb, _), state = run(variables)
    inter = state["intermediates"]
    assert inter["layers_7"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["conv_sep"]["__call__"][0].dtype == jnp.float32  # official: conv_sep(x.float())
    assert emb.dtype == jnp.float32
    for leaf in jax.tree.leaves((variables["params"], state["batch_stats"])):
        assert leaf.dtype == jnp.float32
    # the running statistics moved (PyTorch momentum 0.1 from mean 0 / var 1)
    mean = state["batch_stats"]["features"]["layers_3"]["mean"]
    assert float(jnp.abs(mean).max()) > 0
