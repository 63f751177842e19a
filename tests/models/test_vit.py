"""The ViT-MoE encoder: layout, shapes, MoE placement and error messages."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from facemoe_jax.models import build_model
from facemoe_jax.models.vit import parse_moe_layers


def tiny_model_config(**overrides):
    cfg = common.get_base_config().model
    cfg.update(
        image_size=24,
        patch_size=6,
        width=32,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        embed_dim=16,
        num_experts=4,
        top_k=2,
        drop_path_rate=0.0,
    )
    cfg.update(**overrides)
    return cfg


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("every:2", (1, 3, 5)),
        ("last:2", (4, 5)),
        ("all", (0, 1, 2, 3, 4, 5)),
        ("none", ()),
        ("0,2", (0, 2)),
        ("every:3", (2, 5)),
    ],
)
def test_parse_moe_layers(spec, expected):
    assert parse_moe_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["every:0", "last:9", "1,7", "sometimes"])
def test_parse_moe_layers_errors_name_the_field(spec):
    with pytest.raises(ValueError, match="config.model.moe_layers"):
        parse_moe_layers(spec, 6)


def test_vit_b_layout_has_144_tokens_and_moe_every_second_block():
    cfg = common.get_base_config().model  # ViT-B/9 on 112x112
    model = build_model(cfg)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False)
    )
    params = shapes["params"]
    assert params["pos_embed"].shape == (1, 144, 512)
    assert params["patch_embed"]["kernel"].shape == (9, 9, 3, 512)
    assert "bias" not in params["blocks_0"]["attn"]["qkv"]
    assert "mlp" in params["blocks_0"] and "moe" in params["blocks_1"]
    assert params["blocks_1"]["moe"]["experts"]["fc1_kernel"].shape == (8, 512, 2048)
    assert params["blocks_1"]["moe"]["router"]["gate"]["kernel"].shape == (512, 8)
    assert params["feature_fc1"]["kernel"].shape == (144 * 512, 512)
    assert params["feature_fc2"]["kernel"].shape == (512, 512)
    assert sum(1 for k in params if k.startswith("blocks_") and "moe" in params[k]) == 12


def test_forward_shapes_metrics_and_batch_norm_updates():
    model = build_model(tiny_model_config())
    images = jax.random.uniform(jax.random.key(0), (3, 24, 24, 3), minval=-1, maxval=1)
    variables = model.init(jax.random.key(1), images, train=False)
    (emb, metrics), mutated = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert emb.shape == (3, 16) and emb.dtype == jnp.float32
    assert metrics["router_z_loss"].shape == (2,)  # one entry per MoE block
    assert metrics["expert_load"].shape == (2, 4)
    np.testing.assert_allclose(metrics["expert_load"].sum(-1), 1.0, rtol=1e-6)
    before = variables["batch_stats"]["feature_bn2"]["mean"]
    after = mutated["batch_stats"]["feature_bn2"]["mean"]
    assert not np.allclose(before, after)


def test_dense_model_returns_no_router_metrics():
    model = build_model(tiny_model_config(moe_layers="none"))
    images = jnp.zeros((2, 24, 24, 3))
    variables = model.init(jax.random.key(0), images)
    emb, metrics = model.apply(variables, images)
    assert emb.shape == (2, 16) and metrics == {}


def test_bfloat16_activations_keep_float32_params_and_embeddings():
    model = build_model(tiny_model_config(dtype="bfloat16"))
    images = jnp.zeros((2, 24, 24, 3))
    variables = model.init(jax.random.key(0), images)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    emb, metrics = model.apply(variables, images)
    assert emb.dtype == jnp.float32 and metrics["router_z_loss"].dtype == jnp.float32


def test_wrong_image_size_is_a_clear_error():
    model = build_model(tiny_model_config())
    with pytest.raises(ValueError, match="image_size=24"):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(top_k=5), "top_k=5 is impossible with config.model.num_experts=4"),
        (dict(patch_size=30), "patch_size=30 must be between 1 and config.model.image_size=24"),
        (dict(dtype="float16"), "config.model.dtype='float16'"),
        (dict(router_combine="sparsemax"), "config.model.router_combine='sparsemax'"),
        (dict(name="resnet"), "config.model.name='resnet'"),
    ],
)
def test_build_model_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_model(tiny_model_config(**overrides))


def test_config_is_a_configdict():
    assert isinstance(tiny_model_config(), ml_collections.ConfigDict)
