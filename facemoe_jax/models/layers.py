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
