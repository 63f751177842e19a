"""Expert parallelism: each device holds E / n experts and tokens travel to them by all-to-all.

The mesh has axes `data` and `expert` (`parallel/mesh.py`). The batch is split over *both* axes
(as vmoe does), so the n devices of one `expert` row each hold different images and different
experts. An MoE layer then runs as:

  1. route and dispatch on each device, for its own images only (`per_batch_shard`): routing is
     per image (capacity counts tokens per group), so nothing crosses devices;
  2. move expert buffers to the devices that hold the experts and back (`capacity_experts`:
     `all_to_all` over the `expert` axis), or, on the dropless path whose per-expert row counts
     change every step, gather the expert-sorted row blocks of the `expert` row, compute the
     local experts' blocks and reduce-scatter the results back (`dropless_experts`);
  3. combine on each device, again for its own images only.

Why `shard_map` and not sharding constraints: with constraints alone the SPMD partitioner
all-gathered the routing tensors of every device (the top-k and the slot cumsum do not look
batch-parallel to it), which costs memory that grows with the device count. Inside `shard_map`
every collective is written down, so the communication is exactly one all-to-all (capacity) or
one all-gather plus one reduce-scatter (dropless) per direction and layer.

Everything here is a no-op wrapper when no mesh is active (`jax.set_mesh`), so single-device
code, tests and parameter initialisation see plain functions. Values and gradients equal the
single-device computation (checked on 8 CPU devices in tests/parallel).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from facemoe_jax.kernels import grouped_matmul
from facemoe_jax.parallel.mesh import BATCH_AXES, EXPERT_AXIS, check_expert_split

Array = jax.Array


def context_mesh():
    """The mesh set with `jax.set_mesh` if it has our axes and more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or mesh.size == 1:
        return None
    return mesh


def _batch_shards(mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_shard_count(num_groups: int) -> int:
    """Devices the num_groups images are split over (1 without a mesh or when they do not split
    evenly, the cases in which `per_batch_shard` runs on the global arrays)."""
    mesh = context_mesh()
    if mesh is None or num_groups % _batch_shards(mesh):
        return 1
    return _batch_shards(mesh)


def per_batch_shard(fn: Callable, num_groups: int, *args):
    """fn(*args) run independently on every device's slice of the leading (group) axis.

    Every leaf of args and of the result has the group axis first (for a dropless dispatcher,
    the per-device blocks of its flat arrays). Without an active mesh, or when the num_groups
    images do not split evenly over the devices (e.g. parameter initialisation on 2 dummy
    images), fn runs on the global arrays: same values, partitioned by the compiler. The
    decision depends on num_groups alone, so a dispatcher built by one call is consumed by the
    next in the same layout.
    """
    mesh = context_mesh()
    if mesh is None or num_groups % _batch_shards(mesh):
        return fn(*args)
    return jax.shard_map(fn, in_specs=P(BATCH_AXES), out_specs=P(BATCH_AXES))(*args)


def expert_shards() -> int:
    """Devices the experts are split over in the active mesh (1 without one)."""
    mesh = context_mesh()
    return 1 if mesh is None else mesh.shape[EXPERT_AXIS]


def capacity_experts(mlp: Callable, buffers: Array, weights: tuple[Array, ...]) -> Array:
    """Expert MLPs on (G, E, C, D) dispatch buffers whose experts live on other devices.

    mlp(x (G', E', C, D), weights with leading E') -> same shape, applied per expert. On each
    device the local groups' buffers for expert shard j go to device j of the `expert` axis
    (all_to_all: split E, concatenate G), the local experts run on the buffers of all the
    groups of the row, and the outputs return the same way.
    """
    mesh = context_mesh()
    shards = expert_shards()
    if mesh is None or shards == 1 or buffers.shape[0] % _batch_shards(mesh):
        return mlp(buffers, weights)
    check_expert_split(buffers.shape[1], shards)

    def local(x, local_weights):  # x (G_loc, E, C, D); weights (E_loc, ...)
        x = jax.lax.all_to_all(x, EXPERT_AXIS, split_axis=1, concat_axis=0, tiled=True)
        y = mlp(x, local_weights)  # (shards * G_loc, E_loc, C, D)
        return jax.lax.all_to_all(y, EXPERT_AXIS, split_axis=0, concat_axis=1, tiled=True)

    weight_specs = tuple(P(EXPERT_AXIS) for _ in weights)
    return jax.shard_map(local, in_specs=(P(BATCH_AXES), weight_specs), out_specs=P(BATCH_AXES))(
        buffers, weights
    )


def _segments(group_sizes: Array, block_size: int):
    """One device's (E,) row counts -> its segments (expert, first block, blocks), one per expert."""
    start, count = grouped_matmul.block_layout(group_sizes, block_size)
    return jnp.arange(group_sizes.shape[0], dtype=jnp.int32), start, count


def dropless_experts(
    mlp: Callable, rows: Array, group_sizes: Array, weights: tuple[Array, ...], block_size: int
) -> Array:
    """Expert MLPs on expert-sorted blocks of rows, with the experts possibly on other devices.

    rows (R, D) and group_sizes (E,) are the per-device outputs of the dropless dispatch, laid
    out as `per_batch_shard` returns them: device blocks concatenated, R = devices * R_loc and
    group_sizes of shape (devices * E,). mlp(rows, (expert, start, count), weights) is
    `grouped_matmul.block_expert_mlp`: segment s = blocks [start, start + count) of the rows,
    computed with expert[s]'s weights; rows in no segment come out zero.

    Per device: all-gather the rows and counts of the `expert` row of the mesh, and run the
    local E / n experts on their blocks from each of the n devices (n * E / n segments); the
    other experts' blocks stay zero, so a reduce-scatter gives every device its own rows, each
    computed by the one device that holds its expert.
    """
    mesh = context_mesh()
    shards = expert_shards()
    num_experts = weights[0].shape[0]
    # Dispatched globally (per_batch_shard fell back): one (E,) count vector, no device blocks.
    if mesh is None or group_sizes.shape[0] != _batch_shards(mesh) * num_experts:
        return mlp(rows, _segments(group_sizes, block_size), weights)

    def own_experts(local_rows, local_sizes, local_weights):
        return mlp(local_rows, _segments(local_sizes, block_size), local_weights)

    if shards == 1:  # every device holds every expert: its own rows, its own counts
        return jax.shard_map(
            own_experts, in_specs=(P(BATCH_AXES), P(BATCH_AXES), P()), out_specs=P(BATCH_AXES)
        )(rows, group_sizes, weights)
    check_expert_split(num_experts, shards)
    local_experts = num_experts // shards

    def local(local_rows, local_sizes, local_weights):  # (R_loc, D), (E,), (E_loc, ...)
        blocks_per_device = local_rows.shape[0] // block_size
        all_rows = jax.lax.all_gather(local_rows, EXPERT_AXIS, tiled=True)  # (n * R_loc, D)
        all_sizes = jax.lax.all_gather(local_sizes, EXPERT_AXIS)  # (n, E)
        start, count = jax.vmap(lambda g: grouped_matmul.block_layout(g, block_size))(all_sizes)
        start = start + blocks_per_device * jnp.arange(shards, dtype=jnp.int32)[:, None]
        first = jax.lax.axis_index(EXPERT_AXIS) * local_experts
        start = jax.lax.dynamic_slice_in_dim(start, first, local_experts, 1).reshape(-1)
        count = jax.lax.dynamic_slice_in_dim(count, first, local_experts, 1).reshape(-1)
        expert = jnp.tile(jnp.arange(local_experts, dtype=jnp.int32), shards)
        out = mlp(all_rows, (expert, start, count), local_weights)
        return jax.lax.psum_scatter(out, EXPERT_AXIS, scatter_dimension=0, tiled=True)

    weight_specs = tuple(P(EXPERT_AXIS) for _ in weights)
    return jax.shard_map(
        local,
        in_specs=(P(BATCH_AXES), P(BATCH_AXES), weight_specs),
        out_specs=P(BATCH_AXES),
    )(rows, group_sizes, weights)
