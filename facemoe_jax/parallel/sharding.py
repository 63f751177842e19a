"""Parameter sharding as data: (regex, PartitionSpec) rules over state paths -> NamedShardings.

`config.sharding_rules` is a tuple of `(pattern, spec)` pairs. Each array of the train state has
a path such as `params/encoder/block_1/mlp/experts/fc1_kernel` or
`opt_state/1/0/mu/encoder/block_1/mlp/experts/fc1_kernel` (optimiser moments share the
parameter's path, so one rule shards both); the first pattern that `re.search`es the path gives
its spec, and arrays no rule matches are replicated. A spec lists, per leading array dimension,
`None`, a mesh axis name, or a tuple of axis names; trailing dimensions are not split. The
default rules split expert weights over `expert` (their leading E axis) and the class centres
over every device (their class axis), the two arrays that grow with the problem.

`state_shardings` turns the rules into a NamedSharding tree for `jax.eval_shape(init)`; the
state is then created in place (`jit(init, out_shardings=...)`) or restored into it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from facemoe_jax.parallel.mesh import check_expert_split

CLASS_CENTERS_PATH = "params/classifier/centers"
# A state leaf under a "per_class" key (an objective's per-class statistics, train/objectives/)
# has one row per class-centre row.
PER_CLASS_KEY = "per_class"


def path_name(path: Sequence[Any]) -> str:
    """A jax key path as 'a/b/0/c' (dict keys, attribute names and sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def partition_spec(spec) -> P:
    """('expert',) or (('data', 'expert'), None) or None -> PartitionSpec, validated."""
    if spec is None:
        return P()
    if isinstance(spec, str) or not isinstance(spec, (tuple, list)):
        raise ValueError(
            f"sharding spec {spec!r} must be a tuple with one entry per array dimension"
        )
    entries = []
    for entry in spec:
        if entry is None or isinstance(entry, str):
            entries.append(entry)
        elif isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
            entries.append(tuple(entry))
        else:
            raise ValueError(f"sharding spec {spec!r}: entry {entry!r} is not an axis name")
    return P(*entries)


def spec_for(path: str, rules) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return partition_spec(spec)
    return P()


def _checked(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> P:
    """spec if it fits the array and the mesh; errors name the array, dimension and sizes."""
    if not shape:  # scalars (step counters) are always replicated
        return P()
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {tuple(spec)} has more entries than {path} {shape}")
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(
                f"sharding rule for {path} names mesh axes {unknown}; the mesh has "
                f"{tuple(mesh.shape)}"
            )
        shards = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % shards:
            raise ValueError(
                f"{path} {shape}: dimension {dim} of size {shape[dim]} cannot be split over "
                f"{shards} devices (mesh axes {axes})"
            )
    return spec


def state_shardings(abstract_tree, mesh: Mesh, rules):
    """NamedSharding for every leaf of abstract_tree (ShapeDtypeStructs or arrays)."""

    def leaf_sharding(path, leaf):
        name = path_name(path)
        # Per-class statistics are split as the centres are, whatever the rules call their axes.
        if PER_CLASS_KEY in name.split("/"):
            spec = P(class_axes(rules) or None)
        else:
            spec = spec_for(name, rules)
        spec = _checked(name, tuple(leaf.shape), spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def class_axes(rules) -> tuple[str, ...]:
    """Mesh axes the class centres' class dimension is split over (() = replicated)."""
    spec = spec_for(CLASS_CENTERS_PATH, rules)
    if len(spec) > 1 and any(entry is not None for entry in spec[1:]):
        raise ValueError(
            f"sharding rule for {CLASS_CENTERS_PATH} may only split the class dimension, got "
            f"{tuple(spec)}"
        )
    entry = spec[0] if len(spec) else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def check_config(config, mesh: Mesh) -> None:
    """The errors a user can fix in the config, stated in its terms, before any array exists."""
    if config.model.moe_layers != "none":  # a dense model fits any expert axis
        check_expert_split(config.model.num_experts, mesh.shape["expert"])
    axes = class_axes(config.sharding_rules)
    shards = math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
    multiple = config.loss.class_rows_multiple
    if shards > 1 and multiple % shards:
        raise ValueError(
            f"config.loss.class_rows_multiple={multiple} is not a multiple of the {shards} "
            f"devices the class centres are split over (mesh axes {axes}); set it to a multiple "
            f"of {shards}"
        )


def bytes_per_device(tree) -> dict[int, int]:
    """Bytes each device holds of the (sharded) arrays of tree: {device id: bytes}."""
    totals: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
    return totals
