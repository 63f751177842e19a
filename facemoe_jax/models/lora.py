"""Low-rank adapters (LoRA) on a Dense layer, single or mixed per image by quality (PETALface).

PETALface (WACV 2025, Kartik-3004/PETALface `backbones/lora_layers.py`) freezes an HR pre-trained
backbone and adds two adapters to every attention qkv projection, mixed per image by an image
quality value `a`:

  y = W x + b + s * Drop(B1 A1 ((1 - a) x)) + s * Drop(B2 A2 (a x))       (`LoRADense`, mixed)
  y = W x + b + s * Drop(B A x)                                            (`LoRADense`, single)

A is (rank x in), B is (out x rank), no biases, s = `scale` (1 in every released command: no
alpha / rank factor), Drop = dropout 0.1 on the adapter output. Because every step is linear the
mixed form is (1 - a) s B1 A1 x + a s B2 A2 x: `a = 0` uses adapter 1 alone, `a = 1` adapter 2.
`a` is one value per image; for Swin's windows it arrives repeated over the windows of an image
(the official `repeat_interleave`), here as a leading-axis array that broadcasts over the rest.

Parameter names give the official state_dict keys through the export rules:
`qkv/kernel`, `qkv/bias`, `qkv/trainable_lora_down/kernel` (in, r), `qkv/trainable_lora_up/kernel`
(r, out) and the `..._down2` / `..._up2` pair -> `qkv.trainable_lora_down.weight` [r, in] ...

Initialisation (`adapter_init`, config.model.lora.init):
  "official": A and B both trunc_normal(0.02): what the released model really starts from (the
     model's closing init pass re-initialises every Linear, LoRA's included), so the adapted
     model does not start as the pre-trained one;
  "zero_up": A ~ N(0, 1/r^2), B = 0 (the LoRA paper): the adapted model starts exactly as the
     pre-trained one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

INITS = ("official", "zero_up")


def adapter_initializers(init: str, rank: int):
    """(down kernel init, up kernel init) for the (in, r) and (r, out) Flax kernels."""
    if init == "official":
        normal = nn.initializers.truncated_normal(0.02)
        return normal, normal
    if init == "zero_up":
        return nn.initializers.normal(1.0 / rank), nn.initializers.zeros
    raise ValueError(f"config.model.lora.init={init!r} is not one of {INITS}")


class LoRADense(nn.Module):
    """A Dense layer plus one adapter (quality_mix=False) or two quality-mixed adapters."""

    features: int
    rank: int
    scale: float = 1.0
    dropout: float = 0.1
    adapter_init: str = "official"
    quality_mix: bool = True
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, quality: Array | None = None, deterministic: bool = True):
        # The frozen layer's own parameters sit beside the adapters (`qkv/kernel`, `qkv/bias`),
        # named and initialised as nn.Dense, so a checkpoint without adapters fills them.
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        down_init, up_init = adapter_initializers(self.adapter_init, self.rank)
        suffixes = ("", "2") if self.quality_mix else ("",)
        if self.quality_mix:
            if quality is None:
                raise ValueError(
                    "a quality-mixed LoRA layer needs the per-image quality `a` (model input "
                    "`quality`): config.model.lora.quality_mix=True"
                )
            a = quality.astype(x.dtype).reshape(quality.shape + (1,) * (x.ndim - quality.ndim))
            inputs = ((1.0 - a) * x, a * x)
        else:
            inputs = (x,)
        for suffix, adapter_input in zip(suffixes, inputs):
            h = nn.Dense(
                self.rank,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=down_init,
                name=f"trainable_lora_down{suffix}",
            )(adapter_input)
            h = nn.Dense(
                self.features,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=up_init,
                name=f"trainable_lora_up{suffix}",
            )(h)
            h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
            y = y + self.scale * h
        return y


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """config.model.lora as a hashable module attribute (None on a model = no adapters)."""

    rank: int
    scale: float = 1.0
    dropout: float = 0.1
    init: str = "official"
    quality_mix: bool = True
    targets: tuple[str, ...] = ("qkv",)  # among TARGETS
    head: bool = False  # one plain adapter on the embedding projection (PETALface's feature_fc)


TARGETS = ("qkv", "proj", "mlp", "pointwise")  # pointwise: an ONNX graph's 1x1 convolutions


def settings_from_config(cfg) -> LoRASettings | None:
    """config.model.lora -> LoRASettings, or None when absent or rank 0; errors name the field."""
    # A model config built from a file (an ONNX graph: registry.onnx_model_config) has no lora
    # section: such a model has no adapters.
    lora = cfg.get("lora") if hasattr(cfg, "get") else None
    if lora is None or int(lora.rank) == 0:
        return None
    targets = tuple(t.strip() for t in str(lora.where).split(",") if t.strip())
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"config.model.lora.where={lora.where!r}: {bad} not among {TARGETS}")
    if int(lora.rank) < 0:
        raise ValueError(f"config.model.lora.rank={lora.rank} must be >= 0 (0 = no adapters)")
    adapter_initializers(str(lora.init), int(lora.rank))  # validates init
    if not 0.0 <= float(lora.dropout) < 1.0:
        raise ValueError(f"config.model.lora.dropout={lora.dropout} must be in [0, 1)")
    return LoRASettings(
        rank=int(lora.rank),
        scale=float(lora.scale),
        dropout=float(lora.dropout),
        init=str(lora.init),
        quality_mix=bool(lora.quality_mix),
        targets=targets,
        head=bool(lora.head),
    )


def projection(
    x,
    features: int,
    name: str,
    lora: LoRASettings | None,
    target: str,
    quality=None,
    train: bool = False,
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
):
    """`nn.Dense(features, name=name)(x)`, or a `LoRADense` of the same name where the settings
    adapt `target`. Call it inside a compact method: the layer belongs to the caller."""
    if lora is None or target not in lora.targets:
        return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)(x)
    return LoRADense(
        features,
        lora.rank,
        lora.scale,
        lora.dropout,
        lora.init,
        lora.quality_mix,
        use_bias,
        dtype,
        name=name,
    )(x, quality if lora.quality_mix else None, deterministic=not train)
