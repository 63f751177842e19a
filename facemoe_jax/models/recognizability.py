"""The recognizability heads every encoder can carry (off by default: no parameters, no change).

- **Perceptibility attention** (`PerceptibilityAttention`): a learned score per token (ViT and
  Swin tokens after the final LayerNorm; CNN feature-map positions before the head), softmax over
  the N positions, and each token scaled by N * weight before the encoder's own pooling (the
  flatten -> Dense head of the face models). The score's output layer starts at zero, so the
  weights start uniform (1/N, scale 1): a pre-trained encoder is unchanged until the attention
  learns. The weights are sown as intermediates "perceptibility/weights" (B, N), drawn over the
  average face by the evaluation (as the routing maps are).
- **Quality head** (`QualityHead`): the raw embedding -> Dense(hidden) -> ReLU -> Dropout ->
  Dense(1) -> sigmoid, one score in (0, 1) per image, trained to regress the recognizability
  index of stop-gradient embeddings (losses/recognizability.py: the train step applies the
  head's parameters to the embeddings of the batch's copies at many resolutions) and sown as
  intermediates "quality" (B,), so quality needs no label at test time (`FaceEncoder.quality`).

The architecture of both is our choice: the paper's exact attention and regression layers are
not known (see losses/recognizability.py).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_NAME = "perceptibility"
QUALITY_NAME = "quality_head"  # the head's parameters, directly under the encoder's
QUALITY_KEY = "quality"  # the encoders sow the quality head's (B,) prediction under this name


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """config.model.perceptibility_attention / quality_head (+ their sizes)."""

    perceptibility_attention: bool = False
    attention_hidden: int = 64
    quality_head: bool = False
    quality_hidden: int = 128
    quality_dropout: float = 0.1


class PerceptibilityAttention(nn.Module):
    """tokens (B, N, C) -> (tokens * N * softmax_N(score(tokens)), weights (B, N))."""

    hidden: int = 64

    @nn.compact
    def __call__(self, tokens: jax.Array):
        h = jnp.tanh(nn.Dense(self.hidden, name="score_fc1")(tokens.astype(jnp.float32)))
        logits = nn.Dense(1, kernel_init=nn.initializers.zeros, name="score_fc2")(h)[..., 0]
        weights = jax.nn.softmax(logits, axis=-1)
        self.sow("intermediates", "weights", weights)
        scale = (tokens.shape[1] * weights)[..., None].astype(tokens.dtype)
        return tokens * scale, weights


class QualityHead(nn.Module):
    hidden: int = 128
    dropout: float = 0.1

    @nn.compact
    def __call__(self, embeddings: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(self.hidden, name="fc1")(embeddings.astype(jnp.float32))
        x = nn.Dropout(self.dropout, deterministic=not train)(jax.nn.relu(x))
        return jax.nn.sigmoid(nn.Dense(1, name="fc2")(x)[..., 0])


def attend(settings: HeadSettings, tokens: jax.Array) -> jax.Array:
    """Called inside an encoder's compact __call__: tokens (B, N, C) re-weighted, or as given."""
    if not settings.perceptibility_attention:
        return tokens
    return PerceptibilityAttention(settings.attention_hidden, name=ATTENTION_NAME)(tokens)[0]


def attend_map(settings: HeadSettings, feature_map: jax.Array) -> jax.Array:
    """`attend` over the H x W positions of a CNN feature map (B, H, W, C)."""
    if not settings.perceptibility_attention:
        return feature_map
    b, h, w, c = feature_map.shape
    return attend(settings, feature_map.reshape(b, h * w, c)).reshape(b, h, w, c)


def estimate_quality(settings: HeadSettings, module: nn.Module, embeddings: jax.Array,
                     train: bool) -> None:  # fmt: skip
    """Called inside an encoder's compact __call__: sows the quality prediction (B,)."""
    if settings.quality_head:
        quality = QualityHead(settings.quality_hidden, settings.quality_dropout,
                              name=QUALITY_NAME)(embeddings, train)  # fmt: skip
        module.sow("intermediates", QUALITY_KEY, quality)
