"""PETALface's Swin: quality-mixed LoRA on qkv, a plain adapter on the head, the shift mask not
applied; JAX and the PyTorch twin agree with the official key names."""

import jax
import numpy as np
import pytest
import torch

from facemoe_jax.interop import convert
from tests.interop.test_convert import images, load_strict, random_variables
from tests.models.test_swin import tiny


def petalface_tiny(**lora):
    cfg = tiny(moe_layers="none")
    cfg.apply_shift_mask = False
    cfg.lora.update({"rank": 2, "head": True, "quality_mix": True, **lora})
    return cfg


@pytest.mark.parametrize("quality_mix", [True, False])
def test_jax_and_pytorch_agree_for_random_weights_and_random_quality(quality_mix):
    cfg = petalface_tiny(quality_mix=quality_mix)
    model, variables = random_variables(cfg)
    x = images(cfg)
    a = np.random.default_rng(3).uniform(-0.3, 1.3, len(x)).astype(np.float32)
    expected, _ = jax.jit(model.apply)(variables, x, quality=a)
    state = convert.jax_to_torch(cfg, variables)
    qkv = "layers.0.blocks.1.attn.qkv"
    assert state[f"{qkv}.trainable_lora_down.weight"].shape == (2, 8)
    assert state[f"{qkv}.trainable_lora_up.weight"].shape == (24, 2)
    assert (f"{qkv}.trainable_lora_down2.weight" in state) == quality_mix
    assert state["feature_layer.2.trainable_lora_down.weight"].shape == (2, 8 * 2 * 9)
    assert "feature_layer.2.trainable_lora_down2.weight" not in state
    assert "layers.0.blocks.1.attn_mask" in state  # kept as a buffer, though never applied
    module = load_strict(cfg, state)
    with torch.no_grad():
        got = module(torch.from_numpy(x).permute(0, 3, 1, 2),
                     torch.from_numpy(a) if quality_mix else None).numpy()  # fmt: skip
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4)
    back = convert.torch_to_jax(cfg, state)  # the official key names import back, bit-exact
    for a_leaf, b_leaf in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a_leaf), np.asarray(b_leaf))


def test_the_shift_mask_option_changes_the_function():
    cfg = petalface_tiny()
    model, variables = random_variables(cfg)
    cfg_masked = petalface_tiny()
    cfg_masked.apply_shift_mask = True
    from facemoe_jax.models import build_model

    a = np.full(4, 0.5, np.float32)
    x = images(cfg)
    unmasked = np.asarray(model.apply(variables, x, quality=a)[0])
    masked = np.asarray(build_model(cfg_masked).apply(variables, x, quality=a)[0])
    assert np.abs(unmasked - masked).max() > 1e-3


def test_lora_keys_into_a_model_without_adapters_is_a_clear_error():
    cfg = petalface_tiny()
    _, variables = random_variables(cfg)
    state = convert.jax_to_torch(cfg, variables)
    plain = tiny(moe_layers="none")
    with pytest.raises(ValueError, match="config.model.lora.rank=0"):
        convert.torch_to_jax(plain, state)


def official_names_and_shapes():
    """The official `swin_256new_iqa(r=8, use_lora=True)` state_dict, listed from the authors'
    code (Kartik-3004/PETALface c213e1d) into data/petalface_swin_r8_state_dict.tsv."""
    import os

    path = os.path.join(os.path.dirname(__file__), "data", "petalface_swin_r8_state_dict.tsv")
    rows = [line.split("\t") for line in open(path).read().splitlines()[1:]]
    return {name: tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
            for name, shape in rows}  # fmt: skip


def test_full_size_export_has_the_official_433_names_and_shapes():
    from configs import petalface

    official = official_names_and_shapes()
    assert len(official) == 433
    cfg = petalface.get_config().model
    ours = {k: tuple(v) for k, v in convert.torch_state_dict_shapes(cfg).items()}
    assert set(ours) ^ set(official) == set()
    assert ours == official
    lora = sum(int(np.prod(s)) for k, s in official.items() if "lora" in k)
    assert lora == 1_441_792  # rank 8: 0.67 % of the 213.7M frozen backbone


def test_merged_adapters_give_a_plain_swin_computing_the_same_for_a_fixed_quality():
    from facemoe_jax.models import build_model

    cfg = petalface_tiny()
    model, variables = random_variables(cfg)
    x = images(cfg)
    a = 0.3
    expected = np.asarray(model.apply(variables, x, quality=np.full(len(x), a, np.float32))[0])
    merged = convert.merge_lora(convert.jax_to_torch(cfg, variables), alpha=a)
    assert not any("lora" in k for k in merged)
    plain = petalface_tiny()
    plain.lora.rank = 0
    plain_variables = convert.torch_to_jax(plain, merged)
    got = np.asarray(build_model(plain).apply(plain_variables, x)[0])
    np.testing.assert_allclose(got, expected, atol=1e-4)
