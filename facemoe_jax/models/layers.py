"""Pieces every encoder shares (ViT, Swin, IResNet, MobileFaceNet)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

BATCH_NORM_EPS = 1e-5  # PyTorch's default
# Flax keeps momentum * old + (1 - momentum) * batch: PyTorch's momentum=0.1.
BATCH_NORM_MOMENTUM = 0.9


def batch_norm(
    train: bool,
    name: str,
    *,
    epsilon: float = BATCH_NORM_EPS,
    dtype: Any = None,
    use_scale: bool = True,
) -> nn.BatchNorm:
    """A BatchNorm with PyTorch's defaults (the official models' layers), batch statistics in
    training and running averages in evaluation; statistics are reduced in float32."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=epsilon,
        use_scale=use_scale,
        dtype=dtype,
        name=name,
    )


def check_image_size(images: Array, image_size: int) -> None:
    """Encoders are built for one input size (the position embedding, the flattened head)."""
    if images.shape[1:3] != (image_size, image_size):
        raise ValueError(
            f"images of shape {images.shape} do not match config.model.image_size={image_size}"
        )


@jax.custom_vjp
def add_position_embedding(x: Array, pos: Array) -> Array:
    """x (B, N, D) + pos (1, N, D). The same sum; its backward sums the gradient over the batch
    as a product with a vector of ones: XLA:CPU's (YNNPACK) reduction over a leading axis of
    this shape took ~5 ms a step for a (16, 400, 96) gradient, the product ~0.1 ms."""
    return x + pos.astype(x.dtype)


def _add_position_embedding_fwd(x, pos):
    return add_position_embedding(x, pos), pos  # pos only for its dtype


def _add_position_embedding_bwd(pos, g):
    ones = jnp.ones((g.shape[0],), g.dtype)
    pos_grad = jnp.einsum("b,bnd->nd", ones, g, preferred_element_type=jnp.float32)
    return g, pos_grad[None].astype(pos.dtype)


add_position_embedding.defvjp(_add_position_embedding_fwd, _add_position_embedding_bwd)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class PatchEmbed(nn.Module):
    """A stride-p, p x p, VALID convolution (`nn.Conv`'s parameters: kernel (p, p, C, D), bias D)
    computed as non-overlapping patches times one matrix.

    Why not `nn.Conv`: XLA:CPU lowers the strided convolution with two layout transposes around
    it (channel-major image in, channel-major grid out); the patches are one reshape of the image
    and the product one matmul. Returns (B, H/p, W/p, D), as the convolution does.
    """

    features: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        b, h, w, c = images.shape
        p = self.patch_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (p, p, c, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        rows, cols = h // p, w // p  # VALID: a remainder of under p pixels is not covered
        patches = images[:, : rows * p, : cols * p].astype(self.dtype)
        patches = patches.reshape(b, rows, p, cols, p, c)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, rows, cols, p * p * c)
        x = patches @ kernel.reshape(p * p * c, self.features).astype(self.dtype)
        return x + bias.astype(self.dtype)
