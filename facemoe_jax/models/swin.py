"""The official FaceMoE Swin-MoE face encoder, in Flax.

What it computes (FaceMoE `swin_120_topk_moe_loss(num_experts=3, k=2)` at full size):

  images (B, 120, 120, 3) in [-1, 1]
  -> patch_embed: conv 6x6 stride 6 -> (B, 20*20, 384) -> LayerNorm -> + absolute position embedding
  -> 3 stages of Swin blocks (depths 2/18/2, widths 384/768/1536, heads 8/16/16, window 5);
     stages 0 and 1 end with patch merging (2x2 neighbours -> LayerNorm(4C) -> Linear 4C->2C)
  -> LayerNorm -> flatten tokens-major (25 * 1536)
  -> head: BatchNorm -> Dropout(0.25) -> Dense(512, bias) -> BatchNorm  = the face embedding.

A Swin block is `x + attn(norm1(x))` with attention inside non-overlapping windows (odd blocks
shift the windows by window//2 with a cyclic roll and mask the pairs of tokens that the roll
brought together from different image regions), then `x + moe(norm2(x))`. Every block's
feed-forward is an MoE (`MoEFeedForward`) with GELU (exact) experts; the official router
combines the chosen experts with their *raw* logits and processes every token (dropless), which
is `router_combine="raw_logits"`, `capacity_factor=0` in the config.

The window geometry (relative-position index, shift masks) is fixed by the shapes, so it is plain
numpy computed at trace time, not model state; `interop/convert.py` writes the same arrays into
the PyTorch buffers `relative_position_index` and `attn_mask`. Everything is parametric (widths,
depths, heads, window, experts, image size) so tests run a tiny variant of the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.models.layers import (
    DropPath,
    PatchEmbed,
    add_position_embedding,
    batch_norm,
    check_image_size,
)
from facemoe_jax.models.lora import LoRADense, LoRASettings, projection
from facemoe_jax.models.moe import MoEFeedForward
from facemoe_jax.models.quality import QualitySettings
from facemoe_jax.models.recognizability import (
    HeadSettings,
    attend,
    estimate_quality,
    patch_statistics,
)
from facemoe_jax.models.vit import Mlp

Array = jax.Array

LAYER_NORM_EPS = 1e-5
MASKED = -100.0  # the official mask value (added to attention logits)


def stage_resolutions(patch_grid: int, num_stages: int) -> list[int]:
    """Tokens per side in each stage: the grid halves after every stage but the last."""
    return [patch_grid // 2**i for i in range(num_stages)]


def effective_window(resolution: int, window: int) -> tuple[int, int]:
    """(window, shift) of a shifted block: a stage not larger than the window uses one window
    covering it and no shift (as Swin does)."""
    if resolution <= window:
        return resolution, 0
    return window, window // 2


def relative_position_index(window: int) -> np.ndarray:
    """(w*w, w*w) int64: row of the (2w-1)^2 bias table for each (query, key) pair of a window.

    Index = (dy + w - 1) * (2w - 1) + (dx + w - 1) with (dy, dx) = query position - key position.
    """
    ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return (dy * (2 * window - 1) + dx).astype(np.int64)


def window_partition(x, window: int):
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows in row-major order (numpy or jax)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows, window: int, height: int, width: int):
    """Inverse of `window_partition`: (B * nW, w*w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """(nW, w*w, w*w) float32 additive mask of shifted windows: MASKED where the two tokens come
    from different regions of the un-rolled image, 0 elsewhere.

    After rolling by -shift, the last `window` rows (and columns) hold tokens from two regions:
    [-window, -shift) and the wrapped-around [-shift, end); all other rows are one region.
    """
    region = np.zeros((1, resolution, resolution, 1), np.float32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            region[:, rows, cols, :] = label
            label += 1
    labels = window_partition(region, window)[..., 0]  # (nW, w*w)
    different = labels[:, None, :] != labels[:, :, None]
    return np.where(different, MASKED, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows, with a learned relative-position bias per head."""

    num_heads: int
    window: int
    dtype: Any = jnp.float32
    lora: LoRASettings | None = None

    @nn.compact
    def __call__(
        self, x: Array, mask: np.ndarray | None, quality: Array | None = None, train: bool = False
    ) -> Array:
        """x (B*nW, N, C) with N = window**2; mask (nW, N, N) or None; quality (B*nW,) or None."""
        bw, n, c = x.shape
        head_dim = c // self.num_heads
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.truncated_normal(0.02),
            ((2 * self.window - 1) ** 2, self.num_heads),
        )
        bias = table[relative_position_index(self.window).reshape(-1)]
        bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)  # (heads, N, N)

        qkv = projection(x, 3 * c, "qkv", self.lora, "qkv", quality, train, dtype=self.dtype)
        # Split before the head reshape: moving the (q, k, v) axis to the front costs a
        # transposed copy of the (rows, 3C) gradient in the backward pass (~20 % of stage 0).
        q, k, v = (a.reshape(bw, n, self.num_heads, head_dim) for a in jnp.split(qkv, 3, -1))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q * head_dim**-0.5, k).astype(jnp.float32)
        logits = logits + bias[None]
        if mask is not None:
            num_windows = mask.shape[0]
            logits = logits.reshape(-1, num_windows, self.num_heads, n, n) + mask[None, :, None]
            logits = logits.reshape(bw, self.num_heads, n, n)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(bw, n, c)
        return projection(out, c, "proj", self.lora, "proj", quality, train, dtype=self.dtype)


def exact_gelu(x: Array) -> Array:
    """The Swin's activation: GELU with the erf (PyTorch's nn.GELU default), in PyTorch's form
    x * (1 + erf(x / sqrt 2)) / 2. `jax.nn.gelu(approximate=False)` computes it through erfc,
    which XLA:CPU evaluates 2.3x slower (forward; 1.3x with the backward)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention then a feed-forward (MoE or dense), both pre-LN residuals."""

    resolution: int
    num_heads: int
    window: int
    shift: int
    moe: dict | None  # MoEFeedForward keyword arguments; None = a dense MLP
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    lora: LoRASettings | None = None
    apply_shift_mask: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool, quality: Array | None = None):
        b, length, c = x.shape
        side, w, s = self.resolution, self.window, self.shift
        drop_path = DropPath(self.drop_path_rate)

        y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm1")(x)
        y = y.reshape(b, side, side, c)
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        # PETALface's Swin computes the shift mask and never applies it (apply_shift_mask=False).
        mask = shifted_window_mask(side, w, s) if s and self.apply_shift_mask else None
        # One `a` per image, repeated over its windows (windows are image-major).
        window_quality = None if quality is None else jnp.repeat(quality, (side // w) ** 2)
        y = WindowAttention(self.num_heads, w, self.dtype, self.lora, name="attn")(
            window_partition(y, w), mask, window_quality, train
        )
        y = window_reverse(y, w, side, side)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + drop_path(y.reshape(b, length, c), not train)

        y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm2")(x)
        hidden = int(c * self.mlp_ratio)
        if self.moe is None:
            mlp = Mlp(hidden, self.dtype, self.lora, exact_gelu, name="mlp")
            y, metrics = mlp(y, quality, train), None
        else:
            y, metrics = MoEFeedForward(
                hidden_dim=hidden,
                activation=exact_gelu,
                dtype=self.dtype,
                name="mlp",
                **self.moe,
            )(y)
        return x + drop_path(y, not train), metrics


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C): 2x2 neighbours concatenated in the order
    (0,0), (1,0), (0,1), (1,1) (row, col offsets), LayerNorm(4C), bias-free Linear to 2C."""

    resolution: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, _, c = x.shape
        x = x.reshape(b, self.resolution, self.resolution, c)
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        )
        x = x.reshape(b, -1, 4 * c)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
        return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, name="reduction")(x)


class SwinStage(nn.Module):
    """`depth` Swin blocks at one resolution (odd blocks shifted), then optional patch merging.

    `moe_blocks`: which of this stage's blocks (0-based, within the stage) are MoE.
    """

    resolution: int
    depth: int
    num_heads: int
    window: int
    moe: dict
    drop_path_rates: Sequence[float]
    downsample: bool
    moe_blocks: Sequence[int] = ()
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    lora: LoRASettings | None = None
    apply_shift_mask: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool, quality: Array | None = None):
        window, shift = effective_window(self.resolution, self.window)
        metrics = []
        for i in range(self.depth):
            x, m = SwinBlock(
                self.resolution,
                self.num_heads,
                window,
                shift if i % 2 else 0,
                self.moe if i in self.moe_blocks else None,
                self.mlp_ratio,
                self.drop_path_rates[i],
                self.dtype,
                self.lora,
                self.apply_shift_mask,
                name=f"blocks_{i}",
            )(x, train, quality)
            if m is not None:
                metrics.append(m)
        if self.downsample:
            x = PatchMerging(self.resolution, self.dtype, name="downsample")(x)
        return x, metrics


class SwinMoE(nn.Module):
    """Swin-MoE face encoder: images (B, H, W, 3) in [-1, 1] -> ((B, embed_dim) float32, metrics).

    `moe_layers`: the MoE blocks, numbered over all stages in order (0 .. sum(depths) - 1; the
    official FaceMoE model has all of them, a dense Swin none). metrics: the router metrics of
    the MoE blocks, stacked on a leading axis in stage-then-block order, like `ViTMoE` ({} for a
    dense Swin).
    """

    image_size: int = 120
    patch_size: int = 6
    width: int = 384  # stage 0; stage i has width * 2**i
    depths: Sequence[int] = (2, 18, 2)
    num_heads: Sequence[int] = (8, 16, 16)
    window_size: int = 5
    mlp_ratio: float = 4.0
    embed_dim: int = 512
    moe_layers: Sequence[int] = tuple(range(22))
    num_experts: int = 3
    top_k: int = 2
    router_combine: str = "raw_logits"
    capacity_factor: float | None = None
    drop_path_rate: float = 0.05
    head_dropout: float = 0.25
    dtype: Any = jnp.float32
    absolute_pos_embed: bool = True
    apply_shift_mask: bool = True
    lora: LoRASettings | None = None
    quality: QualitySettings = QualitySettings()
    heads: HeadSettings = HeadSettings()  # perceptibility attention, quality head (off)

    @nn.compact
    def __call__(self, images: Array, train: bool = False, quality: Array | None = None):
        """quality: PETALface's per-image `a` (B,) for quality-mixed adapters; None = the
        configured estimator computes it from the images."""
        check_image_size(images, self.image_size)
        embed = PatchEmbed(self.width, self.patch_size, self.dtype, name="patch_embed")
        x = embed(images)
        b, grid, _, d = x.shape
        x = x.reshape(b, grid * grid, d)
        patch = patch_statistics(self.heads, self, x, embed, images)  # quality head input / None
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="patch_norm")(x)
        if self.absolute_pos_embed:
            pos = self.param(
                "absolute_pos_embed", nn.initializers.truncated_normal(0.02), (1, grid * grid, d)
            )
            x = add_position_embedding(x, pos)
        quality = self.quality.resolve(images, quality, self.lora)

        moe = {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "combine": self.router_combine,
            "capacity_factor": self.capacity_factor,
        }
        # Stochastic depth rises linearly over all blocks of all stages (0 .. drop_path_rate).
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        resolutions = stage_resolutions(grid, len(self.depths))
        metrics = []
        for i, depth in enumerate(self.depths):
            start = sum(self.depths[:i])
            x, m = SwinStage(
                resolutions[i],
                depth,
                self.num_heads[i],
                self.window_size,
                moe,
                tuple(rates[start : start + depth]),
                downsample=i < len(self.depths) - 1,
                moe_blocks=tuple(b - start for b in self.moe_layers if start <= b < start + depth),
                mlp_ratio=self.mlp_ratio,
                dtype=self.dtype,
                lora=self.lora,
                apply_shift_mask=self.apply_shift_mask,
                name=f"layers_{i}",
            )(x, train, quality)
            metrics.extend(m)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
        x = attend(self.heads, x)

        x = x.reshape(b, -1).astype(jnp.float32)  # tokens-major, as torch's x.reshape(B, -1)
        x = batch_norm(train, "feature_bn1")(x)
        x = nn.Dropout(self.head_dropout, deterministic=not train)(x)
        if self.lora is not None and self.lora.head:  # one plain adapter, `a` does not touch it
            x = LoRADense(
                self.embed_dim,
                self.lora.rank,
                self.lora.scale,
                self.lora.dropout,
                self.lora.init,
                quality_mix=False,
                name="feature_fc",
            )(x, deterministic=not train)
        else:
            x = nn.Dense(self.embed_dim, name="feature_fc")(x)
        x = batch_norm(train, "feature_bn2")(x)
        estimate_quality(self.heads, self, x, train, patch)
        return x, jax.tree.map(lambda *m: jnp.stack(m), *metrics) if metrics else {}
