"""Margin-based softmax logits for face recognition, and the cross-entropy that consumes them.

All functions are pure and compute in float32 whatever the input dtype: margins act on cosines
close to 1, where bfloat16/float16 have no resolution left.

Shapes: ``cosines`` is ``(B, C)``, the cosine between each of ``B`` L2-normalised embeddings and
each of ``C`` L2-normalised class centres (``C`` may be a Partial FC sample of the classes).
``labels`` is integer ``(B,)``: the column of the row's own class, or ``-1`` when that class is
not among the ``C`` columns (a sampled or sharded classifier); such rows get no margin.

Choices, stated once here:

* ``combined_margin_logits`` follows insightface's ``CombinedMarginLoss`` (arcface_torch): the
  target logit is ``cos(m1 * theta + m2) - m3``; with ``m1 == 1`` and ``m2 == 0`` it is the plain
  subtraction ``cos - m3`` (CosFace, no acos). The angular path has *no* ``theta + m2 > pi``
  correction (no "easy margin", no ``th``/``mm`` fallback of the older ArcFace code): like
  arcface_torch, ``cos(theta + m2)`` is used as is, so for ``theta > pi - m2`` the target logit
  rises again. Those angles do not occur for a trained model's own class.
* arcface_torch applies the angular margin under ``torch.no_grad`` and writes it into the logits,
  so the gradient of the target logit with respect to the cosine is the identity
  ("straight-through"). ``straight_through=True`` reproduces that; ``False`` differentiates
  through ``acos``.
* insightface's arcface_torch only implements ArcFace (``m1 == 1, m3 == 0``) or CosFace
  (``m3 > 0``, ignoring ``m1``/``m2``); here any combination evaluates the general formula of the
  original MXNet combined margin.
* ``adaface_logits`` follows the AdaFace reference code (Kim et al., CVPR 2022), including its
  clamping of *all* cosines to ``[-1 + eps, 1 - eps]`` and its full gradient through ``acos``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Cosines are clipped to [-1 + _ACOS_EPS, 1 - _ACOS_EPS] before acos: the derivative of acos is
# infinite at +-1, and float32 cosines of identical vectors can round to slightly above 1.
_ACOS_EPS = 1e-7

# AdaFace's running statistics start from these values in the reference code
# (``batch_mean = 20``, ``batch_std = 100``); callers initialise their state with them.
ADAFACE_INITIAL_MEAN = 20.0
ADAFACE_INITIAL_STD = 100.0


def _target_mask(labels: jax.Array, num_columns: int) -> jax.Array:
    """(B, C) bool: True at (i, labels[i]); rows with label -1 are all False."""
    labels = jnp.asarray(labels, jnp.int32)
    columns = jnp.arange(num_columns, dtype=jnp.int32)
    return (labels[:, None] == columns[None, :]) & (labels[:, None] >= 0)


def _target_cosines(cosines: jax.Array, labels: jax.Array) -> jax.Array:
    """(B,) cosine of each row's target column (an arbitrary column for label -1, masked later)."""
    safe_labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, cosines.shape[1] - 1)
    return jnp.take_along_axis(cosines, safe_labels[:, None], axis=1)[:, 0]


def combined_margin_logits(
    cosines: jax.Array,
    labels: jax.Array,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    straight_through: bool = True,
) -> jax.Array:
    """Scaled logits with the combined (SphereFace m1, ArcFace m2, CosFace m3) margin.

    For the target column of each row ``i`` with ``labels[i] >= 0``::

        theta  = acos(clip(cos, -1 + 1e-7, 1 - 1e-7))
        target = cos(m1 * theta + m2) - m3

    every other entry (and every entry of a label -1 row) stays ``cos``; the result is multiplied
    by ``scale``. Official FaceMoE configs use ``(m1, m2, m3) = (1, 0, 0.4)``, i.e. CosFace, which
    is computed as ``cos - m3`` without any acos.

    With ``straight_through=True`` the target is ``cos + stop_gradient(target - cos)``: its value
    is the margin formula, its gradient wrt ``cos`` is 1 (arcface_torch's ``no_grad`` trick). For
    CosFace the two settings coincide.

    Args:
      cosines: (B, C) cosines in [-1, 1], any float dtype.
      labels: (B,) int target columns, -1 for "not in this classifier".
    Returns:
      (B, C) float32 logits.
    """
    cosines = jnp.asarray(cosines, jnp.float32)
    target_cos = _target_cosines(cosines, labels)  # (B,)

    if m1 == 1.0 and m2 == 0.0:
        target = target_cos - m3  # CosFace: plain subtraction, gradient 1 either way
    else:
        theta = jnp.arccos(jnp.clip(target_cos, -1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
        margined = jnp.cos(m1 * theta + m2) - m3
        if straight_through:
            target = target_cos + jax.lax.stop_gradient(margined - target_cos)
        else:
            target = margined

    is_target = _target_mask(labels, cosines.shape[1])
    logits = jnp.where(is_target, target[:, None], cosines)
    return logits * jnp.float32(scale)


def adaface_update_stats(
    feature_norms: jax.Array,
    running_mean: jax.Array,
    running_std: jax.Array,
    *,
    t_alpha: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """AdaFace's exponential moving average of the batch's feature-norm mean and std.

    ``safe = stop_gradient(clip(norms, 0.001, 100))``; ``new = t_alpha * batch + (1 - t_alpha) *
    old`` for both the mean and the *unbiased* standard deviation (``torch.std``, ddof=1) of
    ``safe`` over the whole batch (label -1 rows included: the norm does not depend on the label).

    Args:
      feature_norms: (B,) or (B, 1) L2 norms of the un-normalised embeddings, B >= 2.
      running_mean, running_std: scalars, the state (start at ADAFACE_INITIAL_MEAN / _STD).
    Returns:
      (new_running_mean, new_running_std), float32 scalars without gradient.
    """
    safe_norms = _safe_norms(feature_norms)
    if safe_norms.shape[0] < 2:
        raise ValueError(
            f"AdaFace needs at least 2 feature norms for an unbiased std, got {safe_norms.shape[0]}"
        )
    batch_mean = jnp.mean(safe_norms)
    batch_std = jnp.std(safe_norms, ddof=1)
    running_mean = jnp.asarray(running_mean, jnp.float32)
    running_std = jnp.asarray(running_std, jnp.float32)
    new_mean = t_alpha * batch_mean + (1.0 - t_alpha) * running_mean
    new_std = t_alpha * batch_std + (1.0 - t_alpha) * running_std
    return jax.lax.stop_gradient(new_mean), jax.lax.stop_gradient(new_std)


def _safe_norms(feature_norms: jax.Array) -> jax.Array:
    """(B,) float32 norms clipped to [0.001, 100], with no gradient (AdaFace's ``safe_norms``)."""
    norms = jnp.asarray(feature_norms, jnp.float32).reshape(-1)
    return jax.lax.stop_gradient(jnp.clip(norms, 0.001, 100.0))


def adaface_logits(
    cosines: jax.Array,
    labels: jax.Array,
    feature_norms: jax.Array,
    running_mean: jax.Array,
    running_std: jax.Array,
    *,
    margin: float = 0.4,
    h: float = 0.333,
    scale: float = 64.0,
    t_alpha: float = 0.01,
    eps: float = 1e-3,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AdaFace logits: a margin that adapts to image quality, measured by the feature norm.

    Following the reference code, with ``mu, sigma`` the running stats *after* this batch's
    update (see ``adaface_update_stats``)::

        cos     = clip(cosines, -1 + eps, 1 - eps)                  # every entry
        scaler  = clip(h * (safe_norm_i - mu) / (sigma + eps), -1, 1)  # (B,), no gradient
        g_ang   = -margin * scaler                                  # angular margin
        g_add   = margin + margin * scaler                          # additive margin
        target  = cos(clip(acos(cos) + g_ang, eps, pi - eps)) - g_add

    At the extremes: a low-norm (poor quality) sample, scaler = -1, gets the ArcFace margin
    ``cos(theta + margin)``; a high-norm (good quality) one, scaler = +1, gets
    ``cos(theta - margin) - 2 * margin``; scaler = 0 gives CosFace ``cos(theta) - margin``.
    Non-target entries keep the clamped cosine; rows with label -1 get no margin at all. The
    gradient flows through ``acos`` (no straight-through). Output is ``scale * logits``.

    Args:
      cosines: (B, C) cosines. labels: (B,) int, -1 = no target column.
      feature_norms: (B,) or (B, 1) norms of the raw embeddings (B >= 2).
      running_mean, running_std: scalar state, initialised to ADAFACE_INITIAL_MEAN / _STD.
    Returns:
      (logits (B, C) float32, new_running_mean, new_running_std).
    """
    new_mean, new_std = adaface_update_stats(
        feature_norms, running_mean, running_std, t_alpha=t_alpha
    )
    logits = adaface_logits_given_stats(
        cosines,
        labels,
        feature_norms,
        new_mean,
        new_std,
        margin=margin,
        h=h,
        scale=scale,
        eps=eps,
    )
    return logits, new_mean, new_std


def adaface_logits_given_stats(
    cosines: jax.Array,
    labels: jax.Array,
    feature_norms: jax.Array,
    mean: jax.Array,
    std: jax.Array,
    *,
    margin: float = 0.4,
    h: float = 0.333,
    scale: float = 64.0,
    eps: float = 1e-3,
) -> jax.Array:
    """`adaface_logits` with ``mu, sigma`` already updated by this batch (the train step updates
    its state once and builds the logits from the result): (B, C) float32 logits."""
    cosines = jnp.clip(jnp.asarray(cosines, jnp.float32), -1.0 + eps, 1.0 - eps)
    safe_norms = _safe_norms(feature_norms)
    margin_scaler = jnp.clip((safe_norms - mean) / (std + eps) * h, -1.0, 1.0)  # (B,)

    target_cos = _target_cosines(cosines, labels)
    theta = jnp.arccos(target_cos)
    g_angular = -margin * margin_scaler
    g_additive = margin + margin * margin_scaler
    theta_margined = jnp.clip(theta + g_angular, eps, math.pi - eps)
    target = jnp.cos(theta_margined) - g_additive

    is_target = _target_mask(labels, cosines.shape[1])
    return jnp.where(is_target, target[:, None], cosines) * jnp.float32(scale)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy and top-1 accuracy over the rows whose label is not -1.

    ``loss = mean_i [logsumexp(logits_i) - logits_i[label_i]]`` in float32, and
    ``accuracy = mean_i [argmax(logits_i) == label_i]``, both over valid rows only; both are 0
    when no row is valid (so an all-ignored batch contributes no gradient rather than NaN).

    Args:
      logits: (B, C). labels: (B,) int in [0, C) or -1.
    Returns:
      (loss, accuracy), float32 scalars.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    valid = labels >= 0
    num_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)

    log_probs = jax.nn.log_softmax(logits, axis=-1)
    safe_labels = jnp.where(valid, labels, 0)
    target_log_probs = jnp.take_along_axis(log_probs, safe_labels[:, None], axis=1)[:, 0]
    loss = -jnp.sum(jnp.where(valid, target_log_probs, 0.0)) / num_valid

    correct = (jnp.argmax(logits, axis=-1) == labels) & valid
    accuracy = jnp.sum(correct).astype(jnp.float32) / num_valid
    return loss, accuracy
