"""The Swin-MoE: window geometry against brute force, layout, config errors, forward."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import swin_moe_120
from facemoe_jax.interop import convert
from facemoe_jax.models import build_model
from facemoe_jax.models import swin
from tests.interop.test_convert import random_variables


def test_relative_position_index_brute_force():
    w = 3
    cells = list(itertools.product(range(w), range(w)))
    index = swin.relative_position_index(w)
    for (q, (qy, qx)), (k, (ky, kx)) in itertools.product(enumerate(cells), repeat=2):
        assert index[q, k] == (qy - ky + w - 1) * (2 * w - 1) + (qx - kx + w - 1)
    assert index.dtype == np.int64 and index.max() == (2 * w - 1) ** 2 - 1


@pytest.mark.parametrize("side, window, shift", [(6, 3, 1), (20, 5, 2), (10, 5, 2)])
def test_shifted_window_mask_brute_force(side, window, shift):
    """Mask = -100 exactly where, in one rolled window, one token was wrapped around the border
    by the cyclic roll and the other was not (along rows or columns): they were not neighbours."""

    def region(i):  # was rolled-grid coordinate i wrapped around from the other border?
        return (i + shift) % side < shift

    mask = swin.shifted_window_mask(side, window, shift)
    per_side = side // window
    assert mask.shape == (per_side**2, window**2, window**2)
    for wy, wx in itertools.product(range(per_side), repeat=2):
        cells = [
            (wy * window + y, wx * window + x)
            for y, x in itertools.product(range(window), repeat=2)
        ]
        labels = [(region(y), region(x)) for y, x in cells]
        expected = np.array([[0.0 if a == b else -100.0 for b in labels] for a in labels])
        np.testing.assert_array_equal(mask[wy * per_side + wx], expected)


def test_window_partition_inverts():
    x = np.arange(2 * 6 * 6 * 3).reshape(2, 6, 6, 3)
    windows = swin.window_partition(x, 3)
    assert windows.shape == (8, 9, 3)
    np.testing.assert_array_equal(windows[1, :, 0], x[0, 0:3, 3:6, 0].reshape(-1))
    np.testing.assert_array_equal(swin.window_reverse(windows, 3, 6, 6), x)


def test_full_size_layout_matches_the_official_model():
    cfg = swin_moe_120.get_config().model
    variables = convert.abstract_variables(cfg)
    params = variables["params"]
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count == 463_981_776  # the official parameter count (spec), buffers excluded
    assert params["patch_embed"]["kernel"].shape == (6, 6, 3, 384)
    assert params["absolute_pos_embed"].shape == (1, 400, 384)
    blocks = [f"blocks_{i}" for i in sorted(range(18), key=str)]
    assert sorted(params["layers_1"]) == blocks + ["downsample"]
    assert "downsample" not in params["layers_2"]
    experts = params["layers_2"]["blocks_0"]["mlp"]["experts"]
    assert experts["fc1_kernel"].shape == (3, 1536, 6144)
    assert params["feature_fc"]["kernel"].shape == (38400, 512)
    assert variables["batch_stats"]["feature_bn1"]["mean"].shape == (38400,)


def tiny(**overrides):
    cfg = swin_moe_120.get_config().model
    cfg.update(image_size=12, patch_size=2, width=8, embed_dim=8)
    cfg.depths, cfg.stage_heads, cfg.window_size = (2, 1), (1, 2), 3
    cfg.update(**overrides)
    return cfg


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("window_size", 4, "window_size=4 does not tile stage 0"),
        ("stage_heads", (3, 2), r"stage_heads\[0\]=3"),
        ("image_size", 14, "cannot be halved"),
        ("top_k", 4, "top_k=4"),
        ("depths", (2,), "equal length"),
        ("router_combine", "mean", "router_combine"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    cfg = tiny()
    cfg[field] = value
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_forward_metrics_dropout_and_batch_norm():
    cfg = tiny()
    model = build_model(cfg)
    images = jax.random.uniform(jax.random.key(0), (3, 12, 12, 3), minval=-1, maxval=1)
    _, variables = random_variables(cfg)  # random values from shapes: no init compilation

    @jax.jit
    def train_apply(variables, x, rng):
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})

    (emb, metrics), mutated = train_apply(variables, images, jax.random.key(2))
    assert emb.shape == (3, 8) and emb.dtype == jnp.float32
    assert metrics["official_router_z_loss"].shape == (3,)  # one per block: every block is MoE
    np.testing.assert_allclose(metrics["expert_load"].sum(-1), 1.0, rtol=1e-6)
    assert float(metrics["dropped_fraction"].max()) == 0.0  # dropless, as the official loop
    before = variables["batch_stats"]["feature_bn1"]["mean"]
    assert not np.allclose(mutated["batch_stats"]["feature_bn1"]["mean"], before)
    (emb2, _), _ = train_apply(variables, images, jax.random.key(3))
    assert not np.allclose(emb, emb2)  # head dropout (0.25) and drop-path draw from "dropout"


@pytest.mark.parametrize("spec, moe_blocks", [("none", ()), ("1,2", (1, 2)), ("all", (0, 1, 2))])
def test_moe_layers_is_honoured(spec, moe_blocks):
    """Blocks are numbered over all stages (tiny(): stage 0 has blocks 0, 1; stage 1 has 2)."""
    cfg = tiny(moe_layers=spec)
    params = convert.abstract_variables(cfg)["params"]
    blocks = [("layers_0", "blocks_0"), ("layers_0", "blocks_1"), ("layers_1", "blocks_0")]
    for number, (stage, block) in enumerate(blocks):
        mlp = params[stage][block]["mlp"]
        if number in moe_blocks:
            assert sorted(mlp) == ["experts", "router"], (spec, number)
        else:  # a dense block: fc1 -> GELU -> fc2, the official dense Swin names
            assert sorted(mlp) == ["fc1", "fc2"], (spec, number)
            assert mlp["fc1"]["kernel"].shape == (8 * 2 ** int(stage[-1]),) * 1 + (
                4 * 8 * 2 ** int(stage[-1]),
            )
    model, variables = random_variables(cfg)
    emb, metrics = jax.jit(model.apply)(variables, np.zeros((2, 12, 12, 3), np.float32))
    assert emb.shape == (2, 8)
    if moe_blocks:
        assert metrics["router_entropy"].shape == (len(moe_blocks),)
    else:
        assert metrics == {}


def test_partly_dense_swin_matches_its_pytorch_twin():
    from tests.interop.test_convert import images, load_strict, torch_embed

    cfg = tiny(moe_layers="1")
    model, variables = random_variables(cfg)
    x = images(cfg)
    expected, _ = jax.jit(model.apply)(variables, x)
    module = load_strict(cfg, convert.jax_to_torch(cfg, variables))
    assert "layers.0.blocks.0.mlp.fc1.weight" in module.state_dict()
    assert "layers.0.blocks.1.mlp.experts.0.fc1.weight" in module.state_dict()
    np.testing.assert_allclose(torch_embed(module, x), np.asarray(expected), atol=1e-4)
