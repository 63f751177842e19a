"""MobileFaceNet (insightface arcface_torch `mbf` and `mbf_large`) in Flax.

arcface_torch's MobileFaceNet(blocks, scale): `mbf` = blocks (1, 4, 6, 2), scale 2; `mbf_large`
= blocks (2, 8, 12, 4), scale 4 (`config.model.mobilefacenet_blocks` / `mobilefacenet_scale`).
Module names follow its state_dict, so checkpoints move both ways through `interop/convert.py`:

  ConvBlock   layers_0 conv (no bias) -> layers_1 BatchNorm -> layers_2 PReLU
  LinearBlock layers_0 conv (no bias) -> layers_1 BatchNorm
  DepthWise   layers_0 ConvBlock 1x1 to `groups` channels -> layers_1 depthwise ConvBlock k x k
              (stride s) -> layers_2 LinearBlock 1x1 to out channels; + input when residual
  Residual    layers_j DepthWise(c, c, residual) for j < num_block

  layers_0  ConvBlock 3 -> 64*scale, 3x3 stride 2
  layers_1  blocks[0] == 1: ConvBlock 3x3 with 64 groups; else Residual(blocks[0], 128 hidden)
  layers_2  DepthWise 64s -> 64s stride 2 (128 hidden)   layers_3 Residual(blocks[1], 128 hidden)
  layers_4  DepthWise 64s -> 128s stride 2 (256 hidden)  layers_5 Residual(blocks[2], 256 hidden)
  layers_6  DepthWise 128s -> 128s stride 2 (512 hidden) layers_7 Residual(blocks[3], 256 hidden)
  conv_sep  ConvBlock 128s -> 512, 1x1
  features  GDC: layers_0 LinearBlock depthwise 7x7 (valid) -> flatten -> layers_2 Dense (no bias)
            -> layers_3 BatchNorm1d

The hidden widths (64 groups, 128, 256, 512) are the official constants, not scaled. The GDC
kernel is the last feature map's side: 7 at 112x112 as the official, ceil(size / 16) at other
input sizes (small test faces). BatchNorm eps 1e-5, PyTorch momentum 0.1; PReLU per channel at
0.25; convolutions and the Dense kaiming-normal (fan_out, ReLU gain) as the official init.
`dtype=bfloat16` is the official `fp16=True`: `layers` run in bfloat16, `conv_sep` and the GDC head
in float32 (the official `self.conv_sep(x.float())`); BatchNorm statistics are always float32.
Returns (embeddings float32 (B, embed_dim), {}) like the other encoders.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from facemoe_jax.models.iresnet import PReLU, conv
from facemoe_jax.models.layers import batch_norm, check_image_size
from facemoe_jax.models.recognizability import (
    HeadSettings,
    attend_map,
    estimate_quality,
    patch_statistics,
)

Array = jax.Array

KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
DEFAULT_BLOCKS = (1, 4, 6, 2)  # arcface_torch get_mbf
DEFAULT_SCALE = 2
LARGE_BLOCKS = (2, 8, 12, 4)  # arcface_torch get_mbf_large
LARGE_SCALE = 4


def output_side(image_size: int) -> int:
    """Side of the last feature map: four stride-2 convs with padding 1 (112 -> 7)."""
    side = image_size
    for _ in range(4):
        side = math.ceil(side / 2)
    return side


class ConvBlock(nn.Module):
    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    linear: bool = False  # LinearBlock: no PReLU
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = conv(
            self.features,
            self.kernel,
            self.stride,
            self.padding,
            self.dtype,
            "layers_0",
            groups=self.groups,
            kernel_init=KAIMING_FAN_OUT,
        )(x)
        x = batch_norm(train, "layers_1", dtype=self.dtype)(x)
        if not self.linear:
            x = PReLU(self.dtype, name="layers_2")(x)
        return x


class DepthWise(nn.Module):
    features: int
    hidden: int  # the official `groups` argument
    stride: int = 2
    residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = ConvBlock(self.hidden, dtype=self.dtype, name="layers_0")(x, train)
        y = ConvBlock(
            self.hidden, 3, self.stride, 1, groups=self.hidden, dtype=self.dtype, name="layers_1"
        )(y, train)
        y = ConvBlock(self.features, linear=True, dtype=self.dtype, name="layers_2")(y, train)
        return x + y if self.residual else y


class Residual(nn.Module):
    features: int
    num_block: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for j in range(self.num_block):
            x = DepthWise(
                self.features, self.hidden, 1, residual=True, dtype=self.dtype, name=f"layers_{j}"
            )(x, train)
        return x


class MobileFaceNet(nn.Module):
    """images (B, H, W, 3) in [-1, 1] -> ((B, embed_dim) float32, {})."""

    blocks: Sequence[int] = DEFAULT_BLOCKS
    scale: int = DEFAULT_SCALE
    embed_dim: int = 512
    image_size: int = 112
    dtype: Any = jnp.float32
    heads: HeadSettings = HeadSettings()  # perceptibility attention, quality head (off)

    @nn.compact
    def __call__(self, images: Array, train: bool = False):
        check_image_size(images, self.image_size)
        c1, c2, dt = 64 * self.scale, 128 * self.scale, self.dtype
        b0, b1, b2, b3 = self.blocks
        x = images.astype(dt)
        x = ConvBlock(c1, 3, 2, 1, dtype=dt, name="layers_0")(x, train)
        patch = patch_statistics(self.heads, self, x)  # the quality head's input (or None)
        if b0 == 1:
            x = ConvBlock(c1, 3, 1, 1, groups=64, dtype=dt, name="layers_1")(x, train)
        else:
            x = Residual(c1, b0, 128, dtype=dt, name="layers_1")(x, train)
        x = DepthWise(c1, 128, 2, dtype=dt, name="layers_2")(x, train)
        x = Residual(c1, b1, 128, dtype=dt, name="layers_3")(x, train)
        x = DepthWise(c2, 256, 2, dtype=dt, name="layers_4")(x, train)
        x = Residual(c2, b2, 256, dtype=dt, name="layers_5")(x, train)
        x = DepthWise(c2, 512, 2, dtype=dt, name="layers_6")(x, train)
        x = Residual(c2, b3, 256, dtype=dt, name="layers_7")(x, train)

        x = x.astype(jnp.float32)  # the official `self.conv_sep(x.float() if self.fp16 else x)`
        x = ConvBlock(512, dtype=jnp.float32, name="conv_sep")(x, train)
        x = attend_map(self.heads, x)
        x = GDC(self.embed_dim, name="features")(x, train)
        estimate_quality(self.heads, self, x, train, patch)
        return x, {}


class GDC(nn.Module):
    """Global depthwise conv over the whole last map -> flatten -> Dense -> BatchNorm1d."""

    embed_dim: int

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        side = x.shape[1]
        x = ConvBlock(
            x.shape[-1], side, groups=x.shape[-1], linear=True, dtype=jnp.float32, name="layers_0"
        )(x, train)
        x = x.reshape(x.shape[0], -1)  # (B, 1, 1, C) -> (B, C)
        x = nn.Dense(self.embed_dim, use_bias=False, kernel_init=KAIMING_FAN_OUT, name="layers_2")(
            x
        )
        return batch_norm(train, "layers_3", dtype=jnp.float32)(x)
