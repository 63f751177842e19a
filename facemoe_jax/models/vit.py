"""ViT face encoder in the insightface arcface_torch style, with MoE feed-forward blocks.

The dense layout follows insightface's face ViT (also used by PETALface) so that public dense
checkpoints can later be imported and upcycled: patch-embedding conv with bias, a learned position
embedding and no class token, pre-LayerNorm blocks, attention with a fused bias-free qkv, an MLP
with ReLU6, a final LayerNorm, and an embedding head that flattens *all* tokens (the face layout is
spatially fixed after alignment, so position matters more than pooling invariance):
flatten -> Dense(width, no bias) -> BatchNorm -> Dense(embed_dim, no bias) -> BatchNorm.

Blocks listed by `moe_layers` replace the MLP by `MoEFeedForward`. The encoder returns the
embeddings and a dict of router metrics stacked over the MoE blocks (leading axis = MoE block).
insightface's training-time random patch masking is not reproduced.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from facemoe_jax.models.layers import (
    DropPath,
    PatchEmbed,
    add_position_embedding,
    batch_norm,
    check_image_size,
)
from facemoe_jax.models.lora import LoRASettings, projection
from facemoe_jax.models.moe import MoEFeedForward
from facemoe_jax.models.quality import QualitySettings
from facemoe_jax.models.recognizability import (
    HeadSettings,
    attend,
    estimate_quality,
    patch_statistics,
)

Array = jax.Array

LAYER_NORM_EPS = 1e-5
HEAD_BATCH_NORM_EPS = 2e-5


def parse_moe_layers(spec: str, depth: int) -> tuple[int, ...]:
    """Which blocks (0-based) use an MoE feed-forward.

    spec: "every:N" (blocks N-1, 2N-1, ...: every N-th block, ending with the last when N divides
    depth), "last:N", "all", "none", or a comma list of block indices such as "1,3,5".
    """
    spec = spec.strip()
    if spec == "none":
        return ()
    if spec == "all":
        return tuple(range(depth))
    kind, _, value = spec.partition(":")
    try:
        if kind == "every":
            every = int(value)
            if every < 1:
                raise ValueError
            return tuple(range(every - 1, depth, every))
        if kind == "last":
            last = int(value)
            if not 0 <= last <= depth:
                raise ValueError
            return tuple(range(depth - last, depth))
        layers = tuple(sorted({int(v) for v in spec.split(",")}))
    except ValueError:
        raise ValueError(
            f"config.model.moe_layers={spec!r} is not 'every:N', 'last:N', 'all', "
            f"'none' or a list like '1,3,5' for depth {depth}"
        ) from None
    if layers and not (0 <= layers[0] and layers[-1] < depth):
        raise ValueError(f"config.model.moe_layers={spec!r} names blocks outside 0..{depth - 1}")
    return layers


class Attention(nn.Module):
    """Multi-head self-attention with a fused, bias-free qkv projection (insightface layout);
    `lora` adds adapters to qkv / proj (`models/lora.py`), mixed by the per-image `quality`."""

    num_heads: int
    dtype: Any = jnp.float32
    lora: LoRASettings | None = None

    @nn.compact
    def __call__(self, x: Array, quality: Array | None = None, train: bool = False) -> Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = projection(
            x, 3 * d, "qkv", self.lora, "qkv", quality, train, use_bias=False, dtype=self.dtype
        )
        # Split before the head reshape (a transposed copy of the qkv gradient otherwise), then
        # heads before tokens: XLA:CPU's batched products run 1.8x faster forward, 1.2x
        # forward and backward, on two threads (benchmarks/RESULTS.md, 2026-12-08).
        q, k, v = (
            a.reshape(b, n, self.num_heads, head_dim).transpose(0, 2, 1, 3)
            for a in jnp.split(qkv, 3, -1)
        )
        logits = jnp.einsum("bhqc,bhkc->bhqk", q, k) * head_dim**-0.5
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bhkc->bhqc", weights, v).transpose(0, 2, 1, 3).reshape(b, n, d)
        return projection(out, d, "proj", self.lora, "proj", quality, train, dtype=self.dtype)


class Mlp(nn.Module):
    """The dense feed-forward fc1 -> activation -> fc2 (ReLU6 here as insightface's ViT; the
    dense Swin blocks use it with exact GELU)."""

    hidden_dim: int
    dtype: Any = jnp.float32
    lora: LoRASettings | None = None
    activation: Callable[[Array], Array] = jax.nn.relu6

    @nn.compact
    def __call__(self, x: Array, quality: Array | None = None, train: bool = False) -> Array:
        h = projection(
            x, self.hidden_dim, "fc1", self.lora, "mlp", quality, train, dtype=self.dtype
        )
        return projection(
            self.activation(h),
            x.shape[-1],
            "fc2",
            self.lora,
            "mlp",
            quality,
            train,
            dtype=self.dtype,
        )


class Block(nn.Module):
    """Pre-LN transformer block; its feed-forward is dense or MoE."""

    num_heads: int
    mlp_dim: int
    moe: dict | None = None  # MoEFeedForward keyword arguments, None = dense MLP
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    lora: LoRASettings | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool, quality: Array | None = None):
        drop_path = DropPath(self.drop_path_rate)
        y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.num_heads, self.dtype, self.lora, name="attn")(y, quality, train)
        x = x + drop_path(y, not train)
        y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm2")(x)
        if self.moe is None:
            y = Mlp(self.mlp_dim, self.dtype, self.lora, name="mlp")(y, quality, train)
            metrics = None
        else:
            y, metrics = MoEFeedForward(
                hidden_dim=self.mlp_dim, dtype=self.dtype, name="moe", **self.moe
            )(y)
        return x + drop_path(y, not train), metrics


class ViTMoE(nn.Module):
    """Face ViT with MoE blocks: images (B, H, W, 3) in [-1, 1] -> ((B, embed_dim) float32, metrics)."""

    image_size: int = 112
    patch_size: int = 9
    width: int = 512
    depth: int = 24
    num_heads: int = 8
    mlp_ratio: float = 4.0
    embed_dim: int = 512
    moe_layers: Sequence[int] = ()
    num_experts: int = 8
    top_k: int = 2
    router_combine: str = "softmax_topk"
    capacity_factor: float | None = None
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
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
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        patch = patch_statistics(self.heads, self, x, embed, images)  # quality head input / None
        pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, h * w, d))
        x = add_position_embedding(x, pos)
        quality = self.quality.resolve(images, quality, self.lora)

        moe = dict(
            num_experts=self.num_experts,
            top_k=self.top_k,
            combine=self.router_combine,
            capacity_factor=self.capacity_factor,
        )
        layer_metrics = []
        for i in range(self.depth):
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x, metrics = Block(
                self.num_heads,
                int(self.width * self.mlp_ratio),
                moe if i in self.moe_layers else None,
                rate,
                self.dtype,
                self.lora,
                name=f"blocks_{i}",
            )(x, train, quality)
            if metrics is not None:
                layer_metrics.append(metrics)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
        x = attend(self.heads, x)

        x = x.reshape(b, -1).astype(jnp.float32)
        x = nn.Dense(self.width, use_bias=False, name="feature_fc1")(x)
        x = batch_norm(train, "feature_bn1", epsilon=HEAD_BATCH_NORM_EPS)(x)
        x = nn.Dense(self.embed_dim, use_bias=False, name="feature_fc2")(x)
        x = batch_norm(train, "feature_bn2", epsilon=HEAD_BATCH_NORM_EPS)(x)
        estimate_quality(self.heads, self, x, train, patch)
        stacked = jax.tree.map(lambda *m: jnp.stack(m), *layer_metrics) if layer_metrics else {}
        return x, stacked
