"""The normalised classifier (one centre per identity) and Partial FC negative sampling.

Face-recognition training sets have up to millions of identities, so the last layer is a
``(num_classes, embed_dim)`` matrix of class centres whose logits are cosines (both sides
L2-normalised) fed to a margin softmax (``margins.py``). Partial FC (An et al., 2022) computes
the softmax over every class present in the batch plus a uniform random sample of the others;
only the sampled centres receive a gradient.

Shapes are static so everything jits. Partial FC v2 keeps ``int(rate * classes)`` classes, or
only the batch's positives when there are more of those (a number known only at run time). Here
``num_target_classes`` is the configured count and ``num_sampled_classes`` the static room
(enough for every positive of the batch); ``partial_fc_select`` fills the room and marks
``max(target, positives)`` columns active, the rest are masked out of the softmax as if never
drawn. So the effective rate is the configured one unless the batch's own classes exceed it, and
the loss returns it as ``partial_fc/effective_rate`` (one entry per class shard) and warns once
when a step exceeds the configured rate.

Statistics: under the class-sharded classifier the softmax is global (max, sum of exponentials
and target combined over devices), as Partial FC v2's distributed softmax. The official FaceMoE
recipes run DDP without SyncBatchNorm, so their head BatchNorm statistics are per GPU (the GPU's
128 images) while the classifier is global; see ``losses/routing.py`` for the balance loss.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from facemoe_jax.core import messages


# Squared-norm floor for L2 normalisation: keeps 1/||x|| and its gradient finite at x = 0
# (same role as torch.nn.functional.normalize's eps=1e-12 on the norm).
_NORM_EPS_SQUARED = 1e-24


def padded_num_classes(num_classes: int, multiple: int) -> int:
    """Rows of the centre matrix: num_classes rounded up to a multiple of `multiple`.

    The class axis is split evenly over the devices, and a checkpoint must restore onto any
    device count, so the row count depends on a fixed multiple (config.loss.class_rows_multiple)
    and never on the mesh. Padding rows are zero, masked out of every softmax and never trained.
    """
    if multiple < 1:
        raise ValueError(f"config.loss.class_rows_multiple={multiple} must be >= 1")
    return -(-num_classes // multiple) * multiple


def init_class_centers(
    rng: jax.Array, num_classes: int, embed_dim: int, dtype=jnp.float32, num_rows: int | None = None
) -> jax.Array:
    """(num_rows, embed_dim) centres: the first num_classes rows drawn from N(0, 0.01**2), as
    Partial FC v2 initialises, the padding rows (num_rows > num_classes) zero."""
    centers = 0.01 * jax.random.normal(rng, (num_classes, embed_dim), jnp.float32)
    if num_rows is not None and num_rows > num_classes:
        centers = jnp.pad(centers, ((0, num_rows - num_classes), (0, 0)))
    return centers.astype(dtype)


def l2_normalize(x: jax.Array) -> jax.Array:
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
        l2_normalize(embeddings),
        l2_normalize(centers).T,
        precision=jax.lax.Precision.HIGHEST,
    )


def num_target_classes(num_classes: int, sample_rate: float) -> int:
    """Classes Partial FC v2 keeps per step at ``sample_rate``: ``int(num_classes * rate)``.

    ``sample_rate == 1.0`` means all of them. At least 1 (a softmax needs a column); a batch with
    more distinct classes than this keeps exactly its own classes instead (``partial_fc_select``).
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if sample_rate == 1.0:
        return int(num_classes)
    return max(int(num_classes * sample_rate), 1)


def num_sampled_classes(num_classes: int, sample_rate: float, batch_size: int) -> int:
    """Static room for Partial FC per step (for jit): at least the target, and at least
    ``batch_size`` so that every positive class of the batch always fits, capped at
    ``num_classes``: ``min(max(num_target_classes, batch_size), num_classes)``.

    Only ``max(target, distinct positives)`` of these columns take part in the softmax
    (``partial_fc_select``); the rest of the room is masked out.
    """
    target = num_target_classes(num_classes, sample_rate)
    if sample_rate == 1.0:
        return target
    return int(min(max(target, batch_size), num_classes))


def partial_fc_select(
    rng: jax.Array,
    labels: jax.Array,
    num_classes: int,
    num_sampled: int,
    num_active,
    num_real=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Partial FC v2's selection with static shapes: ``num_sampled`` columns, some masked.

    Every class gets a uniform score in [0, 1); classes at or past ``num_real`` (padding rows)
    get -1, the batch's classes 2; the top ``num_sampled`` scores are taken. The first
    ``max(num_active, positives)`` of them by score are active: exactly the official
    ``topk(rand with positives = 2, k=num_sample)``, or the positives alone when they are more
    than ``num_active``. Columns are then sorted by class id and each label's column found by
    ``searchsorted``.

    Args:
      rng: PRNG key; the same key and labels give the same selection.
      labels: (B,) int class ids in [0, num_classes); -1 entries are ignored and map to -1.
      num_classes: rows C. num_sampled: static room, min(B, C) <= num_sampled <= C.
      num_active: how many columns the configured rate keeps (int, may be traced).
      num_real: rows below this are real classes (None = all; may be traced).
    Returns:
      class_index: (num_sampled,) int32 sorted class ids (rows of the centre matrix to use).
      local_labels: (B,) int32, position of labels[i] in class_index (-1 where labels[i] == -1).
      active: (num_sampled,) bool, the columns that take part in the softmax.
    """
    labels = jnp.asarray(labels, jnp.int32)
    batch_size = labels.shape[0]
    if num_sampled < min(batch_size, num_classes):
        raise ValueError(
            f"num_sampled ({num_sampled}) must be at least the batch size ({batch_size}) "
            "so that every positive class fits"
        )
    if num_sampled > num_classes:
        raise ValueError(f"num_sampled ({num_sampled}) cannot exceed num_classes ({num_classes})")
    valid = labels >= 0
    scores = jax.random.uniform(rng, (num_classes,), jnp.float32)
    if num_real is not None:
        scores = jnp.where(jnp.arange(num_classes) < num_real, scores, -1.0)
    # Out-of-range index num_classes is dropped, so -1 labels force nothing.
    scores = scores.at[jnp.where(valid, labels, num_classes)].set(2.0, mode="drop")
    top_scores, chosen = jax.lax.top_k(scores, num_sampled)
    num_positive = jnp.sum(top_scores == 2.0)
    keep = jnp.maximum(num_active, num_positive)
    active_by_rank = (jnp.arange(num_sampled) < keep) & (top_scores >= 0.0)
    order = jnp.argsort(chosen)
    class_index = chosen[order].astype(jnp.int32)
    local_labels = jnp.searchsorted(class_index, labels).astype(jnp.int32)
    return class_index, jnp.where(valid, local_labels, -1), active_by_rank[order]


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
    if num_sampled < labels.shape[0]:
        raise ValueError(
            f"num_sampled ({num_sampled}) must be at least the batch size ({labels.shape[0]}) "
            "so that every positive class fits"
        )
    class_index, local_labels, _ = partial_fc_select(
        rng, labels, num_classes, num_sampled, num_sampled
    )
    return class_index, local_labels


_warned_rate = False


def _warn_if_rate_exceeded(effective_rates, sample_rate: float, batch_size: int) -> None:
    """Host callback: one warning per process the first time a shard keeps more than the rate."""
    global _warned_rate
    rates = [float(r) for r in effective_rates.reshape(-1)]
    worst = max(rates)
    if _warned_rate or worst <= sample_rate + 1e-6:
        return
    _warned_rate = True
    shard = rates.index(worst)
    messages.warning(
        f"Partial FC kept {worst:.3f} of the classes of class shard {shard}, above "
        f"config.loss.sample_rate={sample_rate}: the batch ({batch_size} images) holds more of "
        "that shard's classes than the rate allows, and every positive class stays in the "
        "softmax (fewer class shards, i.e. more classes per shard, make it rarer). The rate "
        "of each shard is the metric partial_fc/effective_rate; warned once."
    )


def _report_rates(effective_rates: jax.Array, sample_rate: float, batch_size: int, can_exceed):
    if can_exceed:
        jax.debug.callback(
            _warn_if_rate_exceeded,
            effective_rates,
            sample_rate=sample_rate,
            batch_size=batch_size,
        )


MarginFn = Callable[[jax.Array, jax.Array], jax.Array]


def margin_classifier_loss(
    embeddings: jax.Array,
    centers: jax.Array,
    labels: jax.Array,
    rng: jax.Array | None,
    *,
    sample_rate: float,
    margin_fn: MarginFn,
    num_classes: int | None = None,
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
      num_classes: real classes when ``centers`` has zero padding rows after them (see
        ``padded_num_classes``); None = every row is a class.
    Returns:
      (loss, {"loss/margin_ce": loss, "accuracy": top-1 accuracy of the cosines, without margin,
      over the sampled classes}).
    """
    if num_classes is not None:
        centers = centers[:num_classes]
    num_classes = centers.shape[0]
    batch_size = labels.shape[0]
    target = num_target_classes(num_classes, sample_rate)
    sampling = target < num_classes
    if sampling and rng is None:
        raise ValueError(f"sample_rate {sample_rate} < 1 needs an rng for sampling")
    num_sampled = num_sampled_classes(num_classes, sample_rate, batch_size)
    loss, accuracy, effective_rate = _class_block_loss(
        embeddings,
        centers,
        labels,
        rng,
        margin_fn=margin_fn,
        axes=(),
        real_rows=(num_classes,),
        targets=(target,),
        sampling=sampling,
        num_sampled=num_sampled,
    )
    _report_rates(effective_rate, sample_rate, batch_size, sampling and num_sampled > target)
    return loss, {
        "loss/margin_ce": loss,
        "accuracy": accuracy,
        "partial_fc/effective_rate": effective_rate,
    }


def _shard_index(axes: tuple[str, ...]) -> jax.Array:
    """Position of this device along the (flattened, major-to-minor) mesh axes `axes`."""
    index = jnp.zeros((), jnp.int32)
    for axis in axes:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
    return index


def _class_block_loss(
    embeddings,
    centers,
    labels,
    rng,
    *,
    margin_fn,
    axes,
    real_rows,
    targets,
    sampling,
    num_sampled,
):
    """Loss, accuracy and (shards,) effective rates of the batch against this device's block of
    centre rows; the softmax is assembled across the blocks of the mesh axes `axes` (() = one
    block holding every row: the collectives are then identities, the unsharded loss).

    real_rows / targets: each block's real classes and configured Partial FC count (static);
    num_sampled: the static room of the sample (`num_sampled_classes`).
    """
    num_shards = len(real_rows)
    rows = centers.shape[0]
    shard = _shard_index(axes)
    first = shard * rows
    labels = jnp.asarray(labels, jnp.int32)
    here = (labels >= first) & (labels < first + rows)
    local_labels = jnp.where(here, labels - first, -1)
    class_ids = first + jnp.arange(rows)
    num_real = jnp.asarray(real_rows, jnp.int32)[shard]
    active = None
    if sampling:
        # One block draws with the run's key itself, blocks of a mesh with a key per block.
        block_rng = jax.random.fold_in(rng, shard) if axes else rng
        index, local_labels, active = partial_fc_select(
            block_rng,
            local_labels,
            rows,
            num_sampled,
            jnp.asarray(targets, jnp.int32)[shard],
            num_real,
        )
        if num_sampled < rows:  # else index is every row, in order
            centers, class_ids = centers[index], class_ids[index]
    is_class = (class_ids < first + num_real)[None, :]  # padding rows take no part
    if active is not None:  # columns past the configured count take no part either
        is_class = is_class & active[None, :]
    effective = jnp.sum(is_class) / jnp.maximum(num_real, 1)

    cosines = cosine_logits(embeddings, centers)
    logits = jnp.where(is_class, margin_fn(cosines, local_labels).astype(jnp.float32), -jnp.inf)
    row_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=1)), axes)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1), axes)
    is_target = local_labels[:, None] == jnp.arange(logits.shape[1])[None, :]
    target = jax.lax.psum(jnp.sum(jnp.where(is_target, logits, 0.0), axis=1), axes)
    valid = labels >= 0
    num_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(valid, row_max + jnp.log(sum_exp) - target, 0.0)) / num_valid

    # Accuracy of the classifier itself: nearest class centre by cosine, without the margin
    # (with s=64, m=0.4 the margin logits are wrong long after the embeddings are right).
    cosines = jax.lax.stop_gradient(cosines)  # a metric: no gradient through pmax
    best = jax.lax.pmax(jnp.max(jnp.where(is_class, cosines, -jnp.inf), axis=1), axes)
    target_cos = jax.lax.psum(jnp.sum(jnp.where(is_target, cosines, 0.0), axis=1), axes)
    accuracy = jnp.sum(valid & (target_cos >= best)).astype(jnp.float32) / num_valid
    # (num shards,) on every device (a psum of one-hot rows): a replicated metric, so the host
    # callback needs no gather.
    one_hot = jax.nn.one_hot(shard, num_shards, dtype=jnp.float32)
    return loss, accuracy, jax.lax.psum(one_hot * effective.astype(jnp.float32), axes)


def sharded_margin_classifier_loss(
    embeddings: jax.Array,
    centers: jax.Array,
    labels: jax.Array,
    rng: jax.Array | None,
    *,
    sample_rate: float,
    margin_fn: MarginFn,
    num_classes: int,
    class_axes: tuple[str, ...],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``margin_classifier_loss`` with the class centres split over the mesh axes ``class_axes``.

    The Partial FC idea without per-GPU files: each device holds rows ``[i * R, (i + 1) * R)`` of
    the one global centre matrix, computes the cosines and margin logits of every embedding of
    the batch (all-gathered: B x D is small) against its own rows only, and the softmax is
    assembled from three per-row numbers combined across devices: the max logit (``pmax``),
    the sum of exponentials (``psum``) and the target logit (``psum``; zero on the devices that
    do not hold the row's class). The (B, num_classes) logits never exist on one device, so
    memory per device falls as 1 / devices. Labels are shifted to each device's rows, -1 where
    the class lives elsewhere (the margins leave such rows unchanged).

    Partial FC samples per device, as Partial FC v2 per GPU: ``int(rate * real rows)`` of its
    own real rows (padding rows are never drawn), or exactly the batch's classes it holds when
    those are more; the key is folded with the device index, so at ``sample_rate < 1`` the draw
    (not the expected loss) depends on the device count. The static room per device is
    ``num_sampled_classes(R, rate, B)``; the columns beyond the active count are masked out.
    ``partial_fc/effective_rate`` in the metrics is (num shards,): each shard's active real
    classes over its real classes. At ``sample_rate == 1`` the values equal the unsharded loss.

    Runs the unsharded loss when no mesh is active or ``class_axes`` is empty.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not class_axes or math.prod(mesh.shape[a] for a in class_axes) == 1:
        return margin_classifier_loss(
            embeddings,
            centers,
            labels,
            rng,
            sample_rate=sample_rate,
            margin_fn=margin_fn,
            num_classes=num_classes,
        )
    if sample_rate < 1.0 and rng is None:
        raise ValueError(f"sample_rate {sample_rate} < 1 needs an rng for sampling")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    batch_size = labels.shape[0]

    num_shards = math.prod(mesh.shape[a] for a in class_axes)
    rows = centers.shape[0] // num_shards
    # Real classes per shard and the configured count of each (static: the mesh is known).
    real_rows = [min(max(num_classes - i * rows, 0), rows) for i in range(num_shards)]
    targets = [num_target_classes(r, sample_rate) if r else 0 for r in real_rows]
    sampling = any(t < r for t, r in zip(targets, real_rows))
    num_sampled = max(num_sampled_classes(r, sample_rate, batch_size) for r in real_rows if r)
    can_exceed = any(t < min(batch_size, r) for t, r in zip(targets, real_rows))

    local = functools.partial(
        _class_block_loss,
        margin_fn=margin_fn,
        axes=class_axes,
        real_rows=tuple(real_rows),
        targets=tuple(targets),
        sampling=sampling,
        num_sampled=num_sampled,
    )
    loss, accuracy, effective_rate = jax.shard_map(
        local,
        in_specs=(P(), P(class_axes), P(), P()),
        out_specs=(P(), P(), P()),
        axis_names=set(class_axes),
    )(embeddings, centers, labels, rng)
    _report_rates(effective_rate, sample_rate, batch_size, sampling and can_exceed)
    return loss, {
        "loss/margin_ce": loss,
        "accuracy": accuracy,
        "partial_fc/effective_rate": effective_rate,
    }
