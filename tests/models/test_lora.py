"""LoRA Dense: single and quality-mixed adapters against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.models.lora import LoRADense


def numpy_reference(params, x, a, scale):
    """y = W x + b + s B1 A1 ((1 - a) x) + s B2 A2 (a x) with row-vector kernels (in, out)."""
    y = x @ params["kernel"] + params["bias"]
    a = a.reshape(-1, *([1] * (x.ndim - 1)))
    y = y + scale * (
        ((1 - a) * x)
        @ params["trainable_lora_down"]["kernel"]
        @ params["trainable_lora_up"]["kernel"]
    )
    return y + scale * (
        (a * x) @ params["trainable_lora_down2"]["kernel"] @ params["trainable_lora_up2"]["kernel"]
    )


@pytest.mark.parametrize("a_value", [None, 0.0, 1.0])
def test_quality_mixed_adapters_match_numpy(a_value):
    layer = LoRADense(features=6, rank=2, scale=0.7, adapter_init="official")
    x = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)  # (B, tokens, C)
    a = (
        np.array([0.1, 0.5, 1.3], np.float32)
        if a_value is None
        else np.full(3, a_value, np.float32)
    )
    params = layer.init(jax.random.key(0), x, jnp.asarray(a))["params"]
    assert params["trainable_lora_down"]["kernel"].shape == (4, 2)
    assert params["trainable_lora_up2"]["kernel"].shape == (2, 6)
    got = layer.apply({"params": params}, x, jnp.asarray(a))
    p = jax.tree.map(np.asarray, params)
    np.testing.assert_allclose(got, numpy_reference(p, x, a, 0.7), rtol=1e-5, atol=1e-5)
    if a_value == 0.0:  # adapter 2 does not act at a = 0
        p2 = dict(p, trainable_lora_up2={"kernel": np.zeros((2, 6), np.float32)})
        np.testing.assert_allclose(got, numpy_reference(p2, x, a, 0.7), rtol=1e-5, atol=1e-5)
    if a_value == 1.0:  # nor adapter 1 at a = 1
        p1 = dict(p, trainable_lora_up={"kernel": np.zeros((2, 6), np.float32)})
        np.testing.assert_allclose(got, numpy_reference(p1, x, a, 0.7), rtol=1e-5, atol=1e-5)


def test_single_adapter_and_zero_up_start_as_the_base_layer():
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    single = LoRADense(features=3, rank=2, quality_mix=False, adapter_init="zero_up")
    params = single.init(jax.random.key(1), x)["params"]
    assert sorted(params) == ["bias", "kernel", "trainable_lora_down", "trainable_lora_up"]
    base = x @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    np.testing.assert_allclose(single.apply({"params": params}, x), base, rtol=1e-6)
    with pytest.raises(ValueError, match="needs the per-image quality"):
        LoRADense(features=3, rank=2).init(jax.random.key(1), x)


def test_adapter_dropout_only_in_training():
    layer = LoRADense(features=3, rank=2, quality_mix=False, dropout=0.5)
    x = np.ones((4, 8), np.float32)
    params = layer.init(jax.random.key(2), x)
    eval_out = layer.apply(params, x)
    train_out = layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(eval_out, train_out)
    np.testing.assert_allclose(layer.apply(params, x, deterministic=True), eval_out)
