"""IResNet face encoders (insightface arcface_torch `iresnet18` ... `iresnet200`) in Flax.

The layout is arcface_torch's, so that its checkpoints (MS1MV3/Glint360K r50, r100, ...) load
through `interop/convert.py` and our exports load back into the official definition:

  stem     conv1 3x3 (stride 1, no bias) -> bn1 -> prelu
  layer1..layer4 (64, 128, 256, 512 channels, each starting with stride 2), blocks per stage:
           18: 2,2,2,2   34: 3,4,6,3   50: 3,4,14,3   100: 3,13,30,3   200: 6,26,60,6
  IBasicBlock (pre-activation style, no ReLU after the sum):
           bn1 -> conv1 3x3 -> bn2 -> prelu -> conv2 3x3 (stride s) -> bn3, + shortcut
           shortcut = x, or downsample (conv 1x1 stride s -> BatchNorm) in each stage's first block
  head     bn2 -> flatten (channel-major, as PyTorch's NCHW flatten) -> dropout -> fc (bias)
           -> features (BatchNorm1d whose scale is frozen at 1: arcface_torch sets
              `features.weight.requires_grad = False`; here it has no scale parameter at all and
              the export writes the constant ones)

Every BatchNorm has eps 1e-5 and PyTorch's momentum 0.1 (Flax momentum 0.9). PReLU has one
slope per channel, initialised at 0.25. Initialisation follows arcface_torch: convolutions
N(0, 0.1^2), BatchNorm scale 1 and bias 0, the fc layer PyTorch's default uniform.

`dtype=bfloat16` is arcface_torch's `fp16=True` (autocast over the convolutional body): the body
computes in bfloat16 while parameters and BatchNorm statistics stay float32 (Flax reduces the
batch statistics in float32), and the fc + features head runs in float32 as the official
`self.fc(x.float())`. Training-mode running variances are Flax's biased batch variance (PyTorch
stores the unbiased one): this changes only the statistics a training run accumulates, never
the computation of a given set of weights.

At 112x112 the last stage is 7x7 (the official `fc_scale = 7 * 7`); other input sizes give
ceil(size / 16)^2 positions (tests use small faces), which the official class does not accept.
Returns (embeddings float32 (B, embed_dim), {}) like the other encoders.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from facemoe_jax.kernels import winograd
from facemoe_jax.models.layers import batch_norm, check_image_size
from facemoe_jax.models.recognizability import (
    HeadSettings,
    attend_map,
    estimate_quality,
    patch_statistics,
)

Array = jax.Array

STAGE_BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)
PRELU_INIT = 0.25


class PReLU(nn.Module):
    """Per-channel PReLU (torch.nn.PReLU(C)): x if x >= 0 else a_c * x; a initialised at 0.25."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        slope = self.param(
            "negative_slope", nn.initializers.constant(PRELU_INIT), (x.shape[-1],), jnp.float32
        )
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def conv(
    features: int,
    kernel: int,
    stride: int,
    padding: int,
    dtype: Any,
    name: str,
    groups: int = 1,
    kernel_init=nn.initializers.normal(0.1),
    conv_general_dilated=None,
) -> nn.Conv:
    """A bias-free conv with PyTorch's explicit symmetric padding (not Flax's "SAME");
    `conv_general_dilated`: lax's (None) or a drop-in such as kernels/winograd.py's."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        kernel_init=kernel_init,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def inference_conv(conv_algorithm: str, train: bool):
    """The convolution of an evaluation-mode forward: "winograd" computes the 3x3 stride-1
    convolutions with enough channels by F(2x2, 3x3) (kernels/winograd.py; equal to the direct
    convolution to about 1e-6 of its scale), "direct" keeps XLA's. Training is always direct."""
    if conv_algorithm not in winograd.ALGORITHMS:
        raise ValueError(f"conv_algorithm={conv_algorithm!r} is not one of {winograd.ALGORITHMS}")
    return winograd.conv_general_dilated if conv_algorithm == "winograd" and not train else None


def torch_linear_bias_init(fan_in: int):
    """PyTorch nn.Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class IBasicBlock(nn.Module):
    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    conv_algorithm: str = "direct"

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        conv3x3 = inference_conv(self.conv_algorithm, train)
        out = batch_norm(train, "bn1", dtype=self.dtype)(x)
        out = conv(self.planes, 3, 1, 1, self.dtype, "conv1", conv_general_dilated=conv3x3)(out)
        out = batch_norm(train, "bn2", dtype=self.dtype)(out)
        out = PReLU(self.dtype, name="prelu")(out)
        out = conv(
            self.planes, 3, self.stride, 1, self.dtype, "conv2", conv_general_dilated=conv3x3
        )(out)
        out = batch_norm(train, "bn3", dtype=self.dtype)(out)
        if self.downsample:  # PyTorch: downsample = Sequential(conv1x1, BatchNorm2d)
            x = conv(self.planes, 1, self.stride, 0, self.dtype, "downsample_0")(x)
            x = batch_norm(train, "downsample_1", dtype=self.dtype)(x)
        return out + x


class IResNet(nn.Module):
    """images (B, H, W, 3) in [-1, 1] -> ((B, embed_dim) float32, {})."""

    depth: int = 50
    embed_dim: int = 512
    dropout: float = 0.0
    image_size: int = 112
    dtype: Any = jnp.float32
    conv_algorithm: str = "winograd"  # evaluation-mode 3x3 convolutions (inference_conv)
    heads: HeadSettings = HeadSettings()  # perceptibility attention, quality head (off)

    @nn.compact
    def __call__(self, images: Array, train: bool = False):
        check_image_size(images, self.image_size)
        blocks = STAGE_BLOCKS[self.depth]
        stem = conv(STAGE_WIDTHS[0], 3, 1, 1, self.dtype, "conv1")
        images = images.astype(self.dtype)
        x = batch_norm(train, "bn1", dtype=self.dtype)(stem(images))
        x = PReLU(self.dtype, name="prelu")(x)
        patch = patch_statistics(self.heads, self, x, stem, images)  # quality head input / None
        inplanes = STAGE_WIDTHS[0]
        for stage, (planes, count) in enumerate(zip(STAGE_WIDTHS, blocks)):
            for i in range(count):
                stride = 2 if i == 0 else 1
                x = IBasicBlock(
                    planes,
                    stride,
                    downsample=i == 0 and (stride != 1 or inplanes != planes),
                    dtype=self.dtype,
                    conv_algorithm=self.conv_algorithm,
                    name=f"layer{stage + 1}_{i}",
                )(x, train)
                inplanes = planes
        x = batch_norm(train, "bn2", dtype=self.dtype)(x)
        x = attend_map(self.heads, x)
        b = x.shape[0]
        x = x.transpose(0, 3, 1, 2).reshape(b, -1)  # PyTorch's flatten of NCHW: channel-major
        x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)(x)
        x = x.astype(jnp.float32)  # the official `self.fc(x.float() if self.fp16 else x)`
        x = nn.Dense(
            self.embed_dim,
            kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            bias_init=torch_linear_bias_init(x.shape[-1]),
            name="fc",
        )(x)
        x = batch_norm(train, "features", dtype=jnp.float32, use_scale=False)(x)
        estimate_quality(self.heads, self, x, train, patch)
        return x, {}
