"""Pieces every encoder shares (ViT, Swin, IResNet, MobileFaceNet)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


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
