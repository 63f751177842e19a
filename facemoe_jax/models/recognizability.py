"""The recognizability heads every encoder can carry (off by default: no parameters, no change).

- **Perceptibility attention** (`PerceptibilityAttention`): a learned score per token (ViT and
  Swin tokens after the final LayerNorm; CNN feature-map positions before the head), softmax over
  the N positions, and each token scaled by N * weight before the encoder's own pooling (the
  flatten -> Dense head of the face models). The score's output layer starts at zero, so the
  weights start uniform (1/N, scale 1): a pre-trained encoder is unchanged until the attention
  learns. The weights are sown as intermediates "perceptibility/weights" (B, N), drawn over the
  average face by the evaluation (as the routing maps are).
- **Quality head** (`QualityHead`): its input -> Dense(hidden) -> ReLU -> Dropout -> Dense(1) ->
  sigmoid, one score in (0, 1) per image, trained to regress the recognizability index of
  stop-gradient features (losses/recognizability.py: the train step applies the head's
  parameters to the features of the batch's copies at many resolutions) and sown as
  intermediates "quality" (B,), so quality needs no label at test time (`FaceEncoder.quality`).
  Its input (`quality_input`, config.model.quality_head_input):
    "embedding"        the raw embedding (the first version);
    "patch"            the patch statistics: the tokens right after the patch embedding (ViT,
                       Swin) or the stem's feature map (IResNet, MobileFaceNet), per channel
                       their mean and standard deviation over positions (B, 2C), without
                       gradient, sown as intermediates "quality_patch" (`patch_statistics`);
    "patch+embedding"  both, each through its own LayerNorm, concatenated;
    "multiscale"       the detail statistics (`multiscale_statistics`): per channel of the
                       patch embedding (the stem's convolution for IResNet), over positions,
                       log(rms of its response to the detail x - U_k(x)) - log(std of its
                       response to x) for k = 2, 4 (U_k: k x k average pooling and back), and
                       that log std; (B, 3C), without gradient, sown as "quality_patch";
    "multiscale+embedding"  both (the embedding through its own LayerNorm; the detail
                       statistics as they are: a LayerNorm over them would subtract their mean
                       over channels, which is the resolution signal);
    "multiscale+embedding+norm"  and the log of the embedding's norm, which the LayerNorm of
                       the embedding takes away (the norm is itself a quality signal, MagFace's;
                       the "agreement" target of losses/recognizability.py is learnt with it),
                       times `quality_norm_scale` (8): on the demo model the log norm spreads by
                       about 0.16 over faces, the other inputs by about 1, and Adam moves every
                       weight by about the learning rate whatever its input's scale, so a narrow
                       input is learnt slowly (scale 1: the head's score correlated less with
                       the agreement target, 0.32, than the log norm alone did, 0.45).
  Why the patch statistics: a face encoder is trained to be resolution-invariant, so on the
  demo model the embedding hardly changes above 16 px (cos 0.97 to the 48 px one at 16 px,
  0.994 at 32 px) and a head reading only the embedding cannot tell 24 from 48 px; the spread
  of the first linear filters over positions still falls as detail is lost. Why the detail
  statistics: that spread also varies from face to face (contrast, texture), which the head read
  as resolution; the share of a filter's response that comes from the finest scales (a ratio
  computed from the one input image, by the model) divides the face's own contrast out.

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
PATCH_KEY = "quality_patch"  # ... and the patch / detail statistics (B, 2C / 3C) it reads
QUALITY_INPUTS = (
    "embedding",
    "patch",
    "patch+embedding",
    "multiscale",
    "multiscale+embedding",
    "multiscale+embedding+norm",
)
DETAIL_FACTORS = (2, 4)  # the detail scales of the "multiscale" input: x - U_k(x)


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """config.model.perceptibility_attention / quality_head (+ their sizes)."""

    perceptibility_attention: bool = False
    attention_hidden: int = 64
    quality_head: bool = False
    quality_hidden: int = 128
    quality_dropout: float = 0.1
    quality_input: str = "embedding"  # one of QUALITY_INPUTS
    quality_norm_scale: float = 8.0  # the "+norm" input: log(norm) times this

    @property
    def reads_patches(self) -> bool:
        """The head reads statistics of the first linear layer (sown as PATCH_KEY)."""
        return self.quality_head and self.quality_input != "embedding"

    @property
    def multiscale(self) -> bool:
        return reads_detail_statistics(self.quality_input)


def reads_detail_statistics(quality_input: str) -> bool:
    """Whether a head of this input reads the "multiscale" detail statistics."""
    return quality_input.split("+")[0] == "multiscale"


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
    input: str = "embedding"  # one of QUALITY_INPUTS
    norm_scale: float = 8.0

    @nn.compact
    def __call__(
        self, embeddings: jax.Array, train: bool, patch: jax.Array | None = None
    ) -> jax.Array:
        if self.input == "embedding":  # the first version's head, parameters unchanged
            x = embeddings.astype(jnp.float32)
        else:
            if patch is None:
                raise ValueError(
                    f"a quality head with input {self.input!r} needs the patch "
                    "statistics (`patch_statistics`)"
                )
            patch = patch.astype(jnp.float32)
            # The two inputs differ in scale by orders of magnitude: each is normalised alone.
            # The detail statistics are log-ratios, of order one, and their mean over channels
            # is what says the resolution: no LayerNorm.
            multiscale = reads_detail_statistics(self.input)
            parts = [patch if multiscale else nn.LayerNorm(name="patch_norm")(patch)]
            if "+embedding" in self.input:
                parts.append(nn.LayerNorm(name="embedding_norm")(embeddings.astype(jnp.float32)))
            if self.input.endswith("+norm"):
                norm = jnp.linalg.norm(embeddings.astype(jnp.float32), axis=-1, keepdims=True)
                parts.append(self.norm_scale * jnp.log(norm + 1e-6))
            x = jnp.concatenate(parts, axis=-1)
        x = nn.Dense(self.hidden, name="fc1")(x)
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


def pool_positions(tokens: jax.Array) -> jax.Array:
    """(B, N, C) -> (B, 2C) float32: per channel, the mean and standard deviation over the N
    positions."""
    tokens = tokens.astype(jnp.float32)
    return jnp.concatenate([jnp.mean(tokens, axis=1), jnp.std(tokens, axis=1)], axis=-1)


def down_up(images: jax.Array, factor: int) -> jax.Array:
    """(B, H, W, C) -> each factor x factor block replaced by its mean (average pooling and
    nearest up-sampling back); rows / columns beyond the last whole block are kept as given."""
    b, h, w, c = images.shape
    rows, cols = h // factor, w // factor
    block = images[:, : rows * factor, : cols * factor]
    mean = block.reshape(b, rows, factor, cols, factor, c).mean(axis=(2, 4), keepdims=True)
    mean = jnp.broadcast_to(mean, (b, rows, factor, cols, factor, c))
    return images.at[:, : rows * factor, : cols * factor].set(
        mean.reshape(b, rows * factor, cols * factor, c).astype(images.dtype)
    )


def detail_ratios(tokens: jax.Array, details: list[jax.Array], eps: float = 1e-6) -> jax.Array:
    """tokens (B, N, C): a linear layer's response to the image; details [(B, N, C)]: its
    response to x - U_k(x), one per scale k (bias-free). -> (B, (K + 1) C) float32: per channel,
    log(rms_N(detail_k) + eps) - log(std_N(tokens) + eps) for each k, then log(std_N(tokens) +
    eps)."""
    log_spread = jnp.log(jnp.std(tokens.astype(jnp.float32), axis=1) + eps)
    ratios = [
        jnp.log(jnp.sqrt(jnp.mean(jnp.square(d.astype(jnp.float32)), axis=1)) + eps) - log_spread
        for d in details
    ]
    return jnp.concatenate([*ratios, log_spread], axis=-1)


def multiscale_statistics(embed, images: jax.Array) -> jax.Array:
    """The "multiscale" input of one image batch (B, H, W, 3), computed by the model from its
    own input: `embed` is its first linear layer (images -> (B, ..., C)), applied to x and to
    the detail x - U_k(x); its bias is taken off as embed(0) (the detail is not computed as
    embed(x) - embed(U_k(x)): in bfloat16 that difference of two near-equal responses would be
    mostly rounding for a blurred face)."""

    def flat(t):
        return t.reshape(t.shape[0], -1, t.shape[-1]).astype(jnp.float32)

    tokens = flat(embed(images))
    bias = flat(embed(jnp.zeros_like(images[:1])))
    details = [flat(embed(images - down_up(images, k))) - bias for k in DETAIL_FACTORS]
    return detail_ratios(tokens, details)


def patch_statistics(
    settings: HeadSettings,
    module: nn.Module,
    tokens: jax.Array,
    embed=None,
    images: jax.Array | None = None,
) -> jax.Array | None:
    """Called inside an encoder's compact __call__ on the tokens right after the patch embedding
    (B, N, C) or the stem's map (B, H, W, C): the quality head's patch input, without gradient,
    sown as PATCH_KEY; None when the head does not read it. (B, 2C) `pool_positions`, or for a
    "multiscale" head (B, 3C) `multiscale_statistics` of `embed` (the first linear layer, the
    one that made `tokens` or the one before their normalisation) on `images`."""
    if not settings.reads_patches:
        return None
    if settings.multiscale:
        if embed is None:
            raise ValueError(
                f"config.model.quality_head_input={settings.quality_input!r} needs an encoder "
                "whose first layer is linear (vit_moe, swin_moe, iresnet, onnx); "
                f"{type(module).__name__} has none: use 'patch+embedding'"
            )
        statistics = multiscale_statistics(embed, images)
    else:
        statistics = pool_positions(tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]))
    statistics = jax.lax.stop_gradient(statistics)
    module.sow("intermediates", PATCH_KEY, statistics)
    return statistics


def make_quality_head(settings: HeadSettings) -> QualityHead:
    return QualityHead(
        settings.quality_hidden,
        settings.quality_dropout,
        settings.quality_input,
        settings.quality_norm_scale,
        name=QUALITY_NAME,
    )


def estimate_quality(
    settings: HeadSettings,
    module: nn.Module,
    embeddings: jax.Array,
    train: bool,
    patch: jax.Array | None = None,
) -> None:
    """Called inside an encoder's compact __call__: sows the quality prediction (B,)."""
    if settings.quality_head:
        quality = make_quality_head(settings)(embeddings, train, patch)
        module.sow("intermediates", QUALITY_KEY, quality)


def has_quality_head(model) -> bool:
    heads = getattr(model, "heads", None)
    return bool(heads is not None and heads.quality_head)


def has_perceptibility_attention(model) -> bool:
    heads = getattr(model, "heads", None)
    return bool(heads is not None and heads.perceptibility_attention)


def sown_quality(intermediates) -> jax.Array | None:
    """The quality head's (B,) prediction from a forward pass's "intermediates" collection."""
    if not intermediates or QUALITY_KEY not in intermediates:
        return None
    return intermediates[QUALITY_KEY][0]


def head_quality(model, variables, x, flip_test: bool = True) -> jax.Array:
    """The quality head's score of float images in [-1, 1] (B, H, W, 3) -> (B,) float32; with
    the flip test, the mean of the image and its mirror image."""

    def predict(x):
        _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
        return state["intermediates"][QUALITY_KEY][0].astype(jnp.float32)

    q = predict(x)
    return 0.5 * (q + predict(x[:, :, ::-1])) if flip_test else q
