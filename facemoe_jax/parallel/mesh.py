"""The device mesh from `config.mesh`, and the shardings of batches and replicated values.

Axes: `data` and `expert`. The batch is split over both (as vmoe does), so devices that hold
different experts still each process their own slice of the batch.
"""

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS, EXPERT_AXIS = "data", "expert"
MESH_AXES = (DATA_AXIS, EXPERT_AXIS)
BATCH_AXES = MESH_AXES  # the batch is split over every axis, experts over EXPERT_AXIS only


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Axis sizes with one -1 resolved to the remaining devices; errors name the numbers."""
    unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES}")
    # The section names the axes a run splits; an axis it leaves out has size 1.
    sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh={dict(mesh_cfg)} has more than one axis set to -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh={dict(mesh_cfg)} has an axis size that is not >= 1 or -1")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh={dict(mesh_cfg)} does not fit {num_devices} devices: "
                f"{num_devices} is not divisible by {fixed}"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"config.mesh={dict(mesh_cfg)} needs {int(np.prod(sizes))} devices but "
            f"{num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the devices and over the hosts."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        shape = " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
        raise ValueError(
            f"config.train.batch_size={global_batch_size} cannot be split over the {devices} "
            f"devices of the mesh ({shape})"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"config.train.batch_size={global_batch_size} cannot be split over "
            f"{jax.process_count()} hosts"
        )


def check_expert_split(num_experts: int, expert_shards: int) -> None:
    """Experts split evenly over the `expert` axis (checked at set-up and again at trace time)."""
    if num_experts % expert_shards:
        raise ValueError(
            f"config.model.num_experts={num_experts} cannot be split over "
            f"config.mesh.expert={expert_shards} devices (need a multiple)"
        )


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Per-host numpy batch -> global jax.Arrays sharded over the batch axes of the mesh."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
