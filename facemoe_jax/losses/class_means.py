"""Per-class running means of normalised embeddings, split over devices like the class centres.

The recognizability quality head's "agreement" target (docs/recognizability.md, design note 5)
scores a face by its cosine to the mean of its class's other images. The means live in the train
state as {"mean": (rows, D), "count": (rows,)}, one row per class-centre row, so under the
class-sharded classifier each device holds the rows of the classes it holds
(parallel/sharding.py). For each class y, m_y is the exact mean of the first `window` normalised
embeddings entered, then an EMA of rate 1 / window; it is not normalised, so its length says how
tightly the class's images agree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from facemoe_jax.losses import classifier
from facemoe_jax.losses.classifier import l2_normalize


def zeros(num_rows: int, dim: int) -> dict:
    """No image entered yet: zero means and counts."""
    return {
        "mean": jnp.zeros((num_rows, dim), jnp.float32),
        "count": jnp.zeros((num_rows,), jnp.float32),
    }


def _local_rows(labels, first, rows):
    """Labels as row indices of the rows first .. first + rows - 1 held here; `rows` (out of
    range: dropped by scatters, masked by gathers) for the others."""
    local = labels - first
    return jnp.where((local >= 0) & (local < rows), local, rows)


def _lookup_here(unit, labels, mean, count, first):
    rows = mean.shape[0]
    local = _local_rows(labels, first, rows)
    here = local < rows
    index = jnp.minimum(local, rows - 1)
    agreement = jnp.where(here, jnp.sum(unit * mean[index], axis=-1), 0.0)
    return agreement, jnp.where(here, count[index], 0.0)


def _update_here(mean, count, unit, labels, first, window):
    rows = mean.shape[0]
    local = _local_rows(labels, first, rows)
    added = jnp.zeros((rows,), jnp.float32).at[local].add(1.0, mode="drop")
    summed = jnp.zeros(mean.shape, jnp.float32).at[local].add(unit, mode="drop")
    new_count = count + added
    # An exact running mean over the first `window` images, then an EMA of rate 1 / window
    # (or the step's own mean when more than `window` images of the class arrive at once).
    rate_denominator = jnp.maximum(jnp.minimum(new_count, window), jnp.maximum(added, 1.0))
    mean = mean + (summed - added[:, None] * mean) / rate_denominator[:, None]
    return mean, new_count


def _over_class_shards(fn, class_axes, per_image: bool):
    """Runs fn(unit, labels, mean, count, first) on each device's rows of the class means under
    an active mesh whose `class_axes` split them (per_image: fn's two outputs are per image and
    summed over the devices; else they are the new rows); on the whole arrays otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not class_axes or math.prod(mesh.shape[a] for a in class_axes) == 1:
        return lambda unit, labels, mean, count: fn(unit, labels, mean, count, 0)

    def local(unit, labels, mean, count):
        first = classifier._shard_index(class_axes) * mean.shape[0]  # rows held here
        out = fn(unit, labels, mean, count, first)
        return tuple(jax.lax.psum(x, class_axes) for x in out) if per_image else out

    rows_spec = P(class_axes)
    out_specs = (P(), P()) if per_image else (rows_spec, rows_spec)
    return jax.shard_map(
        local,
        in_specs=(P(), P(), rows_spec, rows_spec),
        out_specs=out_specs,
        axis_names=set(class_axes),
    )


def _unit(embeddings):
    return l2_normalize(jax.lax.stop_gradient(embeddings).astype(jnp.float32))


def lookup(means: dict, embeddings, labels, *, class_axes: tuple[str, ...]):
    """(normalise(e) . m_y, count_y), each (B,) float32 without gradient; under the
    class-sharded mesh each device looks up the rows it holds and the results are summed."""
    fn = _over_class_shards(_lookup_here, class_axes, per_image=True)
    return fn(_unit(embeddings), jnp.asarray(labels, jnp.int32), means["mean"], means["count"])


def update(means: dict, embeddings, labels, window: int, *, class_axes: tuple[str, ...]) -> dict:
    """`means` with the normalised `embeddings` (B, D) of classes `labels` entered; each device
    updates the rows it holds."""
    fn = _over_class_shards(
        lambda u, y, m, c, first: _update_here(m, c, u, y, first, float(window)),
        class_axes,
        per_image=False,
    )
    mean, count = fn(
        _unit(embeddings), jnp.asarray(labels, jnp.int32), means["mean"], means["count"]
    )
    return {"mean": mean, "count": count}
