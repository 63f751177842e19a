"""IResNet (insightface arcface_torch) in Flax: sizes, knobs, precision, and a training smoke.

Weight parity with the official state_dicts is in tests/interop/test_convert_cnn.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import common
from facemoe_jax import FaceEncoder
from facemoe_jax.models import build_model
from facemoe_jax.train.checkpoint import Checkpointer
from tests.train.test_step import fixed_batch, setup


def iresnet_config(**overrides):
    cfg = common.get_base_config().model
    cfg.update(name="iresnet", depth=18, image_size=16, embed_dim=32)
    cfg.update(**overrides)
    return cfg


def abstract(cfg):
    model = build_model(cfg)
    x = jnp.zeros((2, cfg.image_size, cfg.image_size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


@pytest.mark.parametrize("depth, official", [(18, 24025600), (50, 43590848)])
def test_parameter_count_is_the_official_less_the_frozen_features_scale(depth, official):
    # arcface_torch's count (parameters() at 112 px, embedding 512) includes features.weight,
    # the BatchNorm1d scale frozen at 1 that our model has as a constant (512 entries).
    variables = abstract(iresnet_config(depth=depth, image_size=112, embed_dim=512))
    count = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert count == official - 512
    assert "scale" not in variables["params"]["features"]
    flat = traverse_util.flatten_dict(variables)
    assert {x.dtype for x in flat.values()} == {jnp.dtype(jnp.float32)}
    assert variables["params"]["fc"]["kernel"].shape == (512 * 7 * 7, 512)  # fc_scale = 7 * 7
    # one downsample per stage, in the first block
    assert {p[1] for p in flat if "downsample_0" in p} == {f"layer{i}_0" for i in range(1, 5)}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("depth", 42, "config.model.depth=42"),
        ("dropout", 1.0, "config.model.dropout=1.0"),
        ("dtype", "float16", "config.model.dtype='float16'"),
        ("image_size", 8, "config.model.image_size=8"),
        ("conv_algorithm", "fft", "config.model.conv_algorithm='fft'"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        build_model(iresnet_config(**{field: value}))


def test_train_mode_updates_batch_statistics_with_pytorch_momentum():
    cfg = iresnet_config()
    model = build_model(cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)

    @jax.jit
    def run(variables):
        (_, aux), state = model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "fc",
        )
        return aux, state, model.apply(variables, x)[0]

    aux, state, eval_out = run(variables)
    assert aux == {}
    fc_out = state["intermediates"]["fc"]["__call__"][0]
    # running = 0.9 * running + 0.1 * batch (PyTorch momentum 0.1), from zero mean at init
    np.testing.assert_allclose(
        state["batch_stats"]["features"]["mean"], 0.1 * fc_out.mean(0), rtol=1e-4, atol=1e-6
    )
    # eval mode uses the running statistics, so it differs from the batch-normalised output
    assert np.isfinite(np.asarray(eval_out)).all()


def test_dropout_acts_only_in_training():
    cfg = iresnet_config(dropout=0.5)
    model = build_model(cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    plain = build_model(iresnet_config(dropout=0.0))

    @jax.jit
    def outputs(key):
        def train(m):
            return m.apply(
                variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
            )[0][0]

        return (
            model.apply(variables, x)[0],
            plain.apply(variables, x)[0],
            train(model),
            train(plain),
        )

    eval_drop, eval_plain, train_drop, train_plain = outputs(jax.random.key(1))
    np.testing.assert_array_equal(eval_drop, eval_plain)
    assert np.abs(train_drop - train_plain).max() > 1e-2


def test_bfloat16_body_with_float32_statistics_and_head():
    cfg = iresnet_config(dtype="bfloat16")
    model = build_model(cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    (emb, _), state = jax.jit(
        lambda v: model.apply(
            v,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name in ("layer2_1", "bn2", "fc"),
        )
    )(variables)
    inter = state["intermediates"]
    assert inter["layer2_1"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["bn2"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["fc"]["__call__"][0].dtype == jnp.float32
    assert emb.dtype == jnp.float32
    for leaf in jax.tree.leaves((variables["params"], state["batch_stats"])):
        assert leaf.dtype == jnp.float32
    # Same weights in float32: close embeddings (eval mode, running statistics)
    ref, _ = jax.jit(build_model(iresnet_config()).apply)(variables, x)
    low, _ = jax.jit(model.apply)(variables, x)
    cos = np.sum(ref * low, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(low, axis=1)
    assert cos.min() > 0.99, cos


@pytest.mark.slow  # ~70 s on 2 busy cores (the train step compiles an IResNet-18)
def test_training_smoke_losses_partial_fc_and_checkpoint(tmp_path):
    """A few train steps of an IResNet-18 (16 px faces): the margin loss with Partial FC falls,
    BatchNorm statistics move, and a checkpoint restores into FaceEncoder."""
    config = common.get_base_config()
    config.model = iresnet_config(dropout=0.2)
    config.loss.update(scale=16.0, m3=0.1, sample_rate=0.5)
    config.optimizer.update(learning_rate=1e-3, weight_decay=5e-4, warmup_steps=0)
    config.data.num_classes = 32
    model, state, step = setup(config, num_steps=10)
    before = jax.tree.map(np.asarray, state.batch_stats)
    batch = fixed_batch(num_classes=8, per_class=2, size=16)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert float(metrics["train/partial_fc_rate"]) <= 0.5 + 1e-6
    assert metrics["train/router_z_loss"] == 0.0  # a CNN has no router losses
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, state.batch_stats)
    assert all(jax.tree.leaves(moved))

    ckpt = Checkpointer(str(tmp_path), every_steps=1, max_to_keep=1)
    ckpt.save(int(state.step), state, None, config)
    ckpt.close()
    encoder = FaceEncoder.from_checkpoint(str(tmp_path))
    assert encoder.step == 6
    faces = np.asarray(batch["image"][:4])
    got = encoder.embed(faces, flip_test=False, normalize=False)
    variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    expected, _ = jax.jit(model.apply)(variables, jnp.asarray(faces, jnp.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_config_file_builds_every_architecture():
    from configs import iresnet as iresnet_configs

    for arg in ("r18", "r34", "r50", "r100", "r200", "mobilefacenet", "mobilefacenet_large"):
        config = iresnet_configs.get_config(arg)
        model = build_model(config.model)
        assert config.model.image_size == 112 and config.model.dtype == "bfloat16", arg
        if arg.startswith("r"):
            assert model.depth == int(arg[1:])
        else:
            assert tuple(model.blocks) == (
                (1, 4, 6, 2) if arg == "mobilefacenet" else (2, 8, 12, 4)
            )
    config = iresnet_configs.get_config("r50")
    assert (config.loss.m2, config.loss.scale, config.optimizer.name) == (0.5, 64.0, "sgd")
    assert config.train.num_steps == 5_179_510 // 1024 * 20
    with pytest.raises(ValueError, match="r77"):
        iresnet_configs.get_config("r77")
