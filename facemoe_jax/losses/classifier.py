"""The normalised classifier (one centre per identity) and Partial FC negative sampling.

Face-recognition training sets have up to millions of identities, so the last layer is a
``(num_classes, embed_dim)`` matrix of class centres whose logits are cosines (both sides
L2-normalised) fed to a margin softmax (``margins.py``). Partial FC (An et al., 2022) computes
the softmax over every class present in the batch plus a uniform random sample of the others;
only the sampled centres receive a gradient.

Shapes are static so everything jits: the number of sampled classes is fixed per run by
``num_sampled_classes``, and ``partial_fc_sample`` always returns exactly that many.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from facemoe_jax.losses.margins import softmax_cross_entropy

# Squared-norm floor for L2 normalisation: keeps 1/||x|| and its gradient finite at x = 0
# (same role as torch.nn.functional.normalize's eps=1e-12 on the norm).
_NORM_EPS_SQUARED = 1e-24


def init_class_centers(
    rng: jax.Array, num_classes: int, embed_dim: int, dtype=jnp.float32
) -> jax.Array:
    """(num_classes, embed_dim) centres drawn from N(0, 0.01**2), as Partial FC v2 initialises."""
    return (0.01 * jax.random.normal(rng, (num_classes, embed_dim), jnp.float32)).astype(dtype)


def _l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of x divided by their L2 norm (float32), eps-safe for zero rows."""
    x = jnp.asarray(x, jnp.float32)
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS_SQUARED))


def cosine_logits(embeddings: jax.Array, centers: jax.Array) -> jax.Array:
    """(B, C) float32 cosines between embeddings (B, D) and class centres (C, D).

    The matmul runs at HIGHEST precision: margins act on cosines near 1, where TF32 (the GPU
    default for float32) would add errors of order 1e-3.
    """
    return jnp.matmul(
        _l2_normalize(embeddings),
        _l2_normalize(centers).T,
        precision=jax.lax.Precision.HIGHEST,
    )


def num_sampled_classes(num_classes: int, sample_rate: float, batch_size: int) -> int:
    """How many classes Partial FC keeps per step (a static number, for jit).

    ``sample_rate == 1.0`` means no sampling: all ``num_classes``. Otherwise
    ``max(int(num_classes * sample_rate), batch_size)`` capped at ``num_classes``: at least the
    batch size, so that every positive class of the batch always fits.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if sample_rate == 1.0:
        return int(num_classes)
    return int(min(max(int(num_classes * sample_rate), batch_size), num_classes))


def partial_fc_sample(
    rng: jax.Array, labels: jax.Array, num_classes: int, num_sampled: int
) -> tuple[jax.Array, jax.Array]:
    """Choose ``num_sampled`` classes: all of the batch's labels plus uniform random others.

    Every class gets a uniform score in [0, 1); the batch's classes are forced to 2; the top
    ``num_sampled`` scores are kept and sorted ascending; each label's new column is found by
    ``searchsorted``. Same result as Partial FC v2's ``torch.topk`` sampling, with static shapes.

    Args:
      rng: PRNG key; the same key and labels give the same sample.
      labels: (B,) int class ids in [0, num_classes); -1 entries are ignored and map to -1.
      num_classes: total classes C. num_sampled: how many to keep, B <= num_sampled <= C.
    Returns:
      class_index: (num_sampled,) int32 sorted class ids (rows of the centre matrix to use).
      local_labels: (B,) int32, position of labels[i] in class_index (-1 where labels[i] == -1).
    """
    labels = jnp.asarray(labels, jnp.int32)
    batch_size = labels.shape[0]
    if num_sampled < batch_size:
        raise ValueError(
            f"num_sampled ({num_sampled}) must be at least the batch size ({batch_size}) "
            "so that every positive class fits"
        )
    if num_sampled > num_classes:
        raise ValueError(
            f"num_sampled ({num_sampled}) cannot exceed num_classes ({num_classes})"
        )
    valid = labels >= 0
    scores = jax.random.uniform(rng, (num_classes,), jnp.float32)
    # Out-of-range index num_classes is dropped, so -1 labels force nothing.
    scores = scores.at[jnp.where(valid, labels, num_classes)].set(2.0, mode="drop")
    _, chosen = jax.lax.top_k(scores, num_sampled)
    class_index = jnp.sort(chosen).astype(jnp.int32)
    local_labels = jnp.searchsorted(class_index, labels).astype(jnp.int32)
    return class_index, jnp.where(valid, local_labels, -1)


MarginFn = Callable[[jax.Array, jax.Array], jax.Array]


def margin_classifier_loss(
    embeddings: jax.Array,
    centers: jax.Array,
    labels: jax.Array,
    rng: jax.Array | None,
    *,
    sample_rate: float,
    margin_fn: MarginFn,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Margin softmax loss over (a Partial FC sample of) the class centres.

    Steps: if ``sample_rate < 1``, sample classes (``partial_fc_sample``) and gather their rows of
    ``centers`` (the gather makes the gradient of unsampled rows exactly zero); cosines of the
    embeddings against those rows; ``margin_fn(cosines, local_labels) -> logits``; softmax
    cross-entropy (``margins.softmax_cross_entropy``) and the accuracy of the plain cosines.

    ``margin_fn`` is any pure callable of ``(cosines (B, C'), local_labels (B,))``, e.g.
    ``functools.partial(combined_margin_logits, scale=64.0, m3=0.4)``. AdaFace also needs the
    feature norms and its running statistics; wire it with a closure and update the state
    outside, with the same helper ``adaface_logits`` uses, so the numbers agree::

        norms = jnp.linalg.norm(embeddings, axis=-1)
        new_mean, new_std = adaface_update_stats(norms, mean, std)
        margin_fn = lambda cos, lab: adaface_logits(cos, lab, norms, mean, std)[0]

    Args:
      embeddings: (B, D) raw (un-normalised) embeddings.
      centers: (C, D) class centres. labels: (B,) int global class ids (-1 = ignore).
      rng: PRNG key for sampling; may be None when sample_rate == 1.
      sample_rate: share of classes kept, in (0, 1]; 1 = full softmax.
    Returns:
      (loss, {"loss/margin_ce": loss, "accuracy": top-1 accuracy of the cosines, without margin,
      over the sampled classes}).
    """
    labels = jnp.asarray(labels, jnp.int32)
    num_classes = centers.shape[0]
    num_sampled = num_sampled_classes(num_classes, sample_rate, labels.shape[0])
    if num_sampled < num_classes:
        if rng is None:
            raise ValueError(f"sample_rate {sample_rate} < 1 needs an rng for sampling")
        class_index, local_labels = partial_fc_sample(rng, labels, num_classes, num_sampled)
        centers = jnp.take(centers, class_index, axis=0)
    else:
        local_labels = labels

    cosines = cosine_logits(embeddings, centers)
    logits = margin_fn(cosines, local_labels)
    loss, _ = softmax_cross_entropy(logits, local_labels)
    # Accuracy of the classifier itself: nearest class centre by cosine, without the margin
    # (with s=64, m=0.4 the margin logits are wrong long after the embeddings are right).
    _, accuracy = softmax_cross_entropy(cosines, local_labels)
    return loss, {"loss/margin_ce": loss, "accuracy": accuracy}
