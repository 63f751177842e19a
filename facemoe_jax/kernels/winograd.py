"""Winograd F(2x2, 3x3) convolution: the 3x3, stride-1, padding-1 convolutions of inference.

A 3x3 convolution over a 4x4 input tile gives a 2x2 output tile. Winograd's minimal filtering
algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016) writes it
as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

with `*` elementwise over the 4x4 transformed tile. Summed over input channels, the elementwise
product becomes 16 independent (tiles x C) @ (C x K) matrix products: 16 multiplications per
2x2 outputs instead of 36, a 2.25x cut in the dominant work, paid for by the input and output
transforms (additions only, memory-bound). On XLA:CPU the cut wins once the layer has enough
channels for the matrix products to dominate; `MIN_CHANNELS` is where it started to win on the
development machine (benchmarks/RESULTS.md, "CPU inference against onnxruntime").

F(2x2, 3x3) rather than the larger F(4x4, 3x3): its transforms use only 0, +-1 and 1/2, so in
float32 a layer differs from the direct convolution by about 1e-6 of its scale (F(4x4, 3x3),
about 1e-5 per layer, compounds over a 50-layer network).

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (flax's
`nn.Conv(conv_general_dilated=...)`): it takes the Winograd path for a float32 NHWC/HWIO 3x3
convolution with stride 1, padding 1, no dilation, no groups, at least `MIN_CHANNELS` input
channels and `MIN_SIZE` pixels a side, and calls the direct convolution for everything else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Rows of the three transforms (the paper's B^T, G and A^T for m = 2, r = 3).
INPUT_TRANSFORM = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
KERNEL_TRANSFORM = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
OUTPUT_TRANSFORM = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
TILE = 4  # input tile side
STEP = 2  # output tile side
MIN_CHANNELS = 64
MIN_SIZE = 8  # height and width
NHWC = ("NHWC", "HWIO", "NHWC")
# config.model.conv_algorithm: this file's convolution where it applies, or always XLA's.
ALGORITHMS = ("winograd", "direct")


def _combine(matrix: np.ndarray, terms: list[Array]) -> list[Array]:
    """[sum_i matrix[r, i] * terms[i] for each row r], skipping zeros and unit factors, so that
    XLA fuses the transform into additions."""
    rows = []
    for coefficients in matrix:
        total = None
        for c, term in zip(coefficients, terms):
            if c == 0:
                continue
            scaled = term if c == 1 else -term if c == -1 else float(c) * term
            total = scaled if total is None else total + scaled
        rows.append(total)
    return rows


def transform_kernel(kernel: Array) -> Array:
    """(3, 3, C, K) HWIO -> (4, 4, C, K): G g G^T for every (input, output) channel pair."""
    return jnp.einsum(
        "ai,ijck,bj->abck",
        KERNEL_TRANSFORM,
        kernel,
        KERNEL_TRANSFORM,
        precision=jax.lax.Precision.HIGHEST,
    )


def conv3x3(x: Array, kernel: Array) -> Array:
    """The 3x3 convolution of NHWC `x` with HWIO `kernel`, stride 1 and zero padding 1 (the
    output has x's height and width), by F(2x2, 3x3). Any height and width: the last tile row
    and column are padded and cropped."""
    batch, height, width, channels = x.shape
    if kernel.shape[:3] != (3, 3, channels):
        raise ValueError(
            f"conv3x3: kernel {kernel.shape} is not (3, 3, {channels}, K) for {x.shape}"
        )
    out_channels = kernel.shape[-1]
    rows, cols = -(-height // STEP), -(-width // STEP)  # tiles
    padded = jnp.pad(
        x, ((0, 0), (1, STEP * rows - height + 1), (1, STEP * cols - width + 1), (0, 0))
    )
    # tile[i][j]: every tile's element (i, j), as a (batch, rows, cols, C) array.
    tile = [
        [padded[:, i : i + STEP * rows : STEP, j : j + STEP * cols : STEP] for j in range(TILE)]
        for i in range(TILE)
    ]
    by_column = [_combine(INPUT_TRANSFORM, [tile[i][j] for i in range(TILE)]) for j in range(TILE)]
    transformed = [
        _combine(INPUT_TRANSFORM, [by_column[j][p] for j in range(TILE)]) for p in range(TILE)
    ]
    # 16 separate products, not one batched product over a stacked copy: XLA fuses each
    # transform into its product's operand, and the stack's copy cost more than it saved.
    u = transform_kernel(kernel).astype(x.dtype)
    products = [
        [jnp.einsum("brcC,CK->brcK", transformed[p][q], u[p, q]) for q in range(TILE)]
        for p in range(TILE)
    ]
    by_row = [_combine(OUTPUT_TRANSFORM, products[p]) for p in range(TILE)]
    out = [_combine(OUTPUT_TRANSFORM, [by_row[p][s] for p in range(TILE)]) for s in range(STEP)]
    # out[s][r]: output row r, column s of every tile -> (batch, rows, r, cols, s, K)
    y = jnp.stack([jnp.stack([out[s][r] for s in range(STEP)], axis=3) for r in range(STEP)], 2)
    return y.reshape(batch, STEP * rows, STEP * cols, out_channels)[:, :height, :width]


def applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count) -> bool:  # fmt: skip
    """Whether `conv_general_dilated` with these arguments is a convolution `conv3x3` computes
    and one where it is faster."""

    def ones(value):
        return value is None or all(v == 1 for v in value)

    if lhs.ndim != 4 or rhs.ndim != 4:
        return False
    if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):  # a NamedTuple: test first
        nhwc = dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    else:
        nhwc = dimension_numbers is not None and tuple(dimension_numbers) == NHWC
    return (
        nhwc
        and lhs.dtype == jnp.float32
        and rhs.dtype == jnp.float32
        and tuple(rhs.shape[:2]) == (3, 3)
        and lhs.shape[-1] == rhs.shape[2] >= MIN_CHANNELS
        and min(lhs.shape[1:3]) >= MIN_SIZE
        and tuple(window_strides) == (1, 1)
        and not isinstance(padding, str)
        and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
        and ones(lhs_dilation)
        and ones(rhs_dilation)
        and feature_group_count == 1
    )


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`jax.lax.conv_general_dilated`, by `conv3x3` where `applies` says so."""
    exact_default = batch_group_count == 1 and precision is None and preferred_element_type is None
    if exact_default and applies(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count,
    ):  # fmt: skip
        return conv3x3(lhs, rhs)
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
