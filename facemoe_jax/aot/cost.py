"""The AOT report's arithmetic: what the state holds per device, the FLOPs XLA does not count,
the roofline, the meshes to try, and XLA's memory and cost figures of a compiled program."""

from __future__ import annotations

import dataclasses
import math

from facemoe_jax.core import messages

MFU_FOR_THROUGHPUT = 0.5


def state_bytes_by_kind(state) -> dict[str, dict[str, int]]:
    """{"params"|"optimizer": {"centres"|"experts"|"rest": bytes on one device}} of a state of
    sharded ShapeDtypeStructs (the largest shard where shards differ)."""
    import jax
    import numpy as np

    from facemoe_jax.parallel import sharding

    out = {part: {"centres": 0, "experts": 0, "rest": 0} for part in ("params", "optimizer")}
    for part, tree in (("params", state.params), ("optimizer", state.opt_state)):
        for path, leaf in jax.tree.leaves_with_path(tree):
            if not hasattr(leaf, "sharding"):
                continue
            name = sharding.path_name(path)
            kind = "centres" if "centers" in name else "experts" if "experts" in name else "rest"
            shard = leaf.sharding.shard_shape(leaf.shape)
            out[part][kind] += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return out


def dropless_expert_flops(model_cfg, batch_size: int) -> float:
    """FLOPs of one train step's dropless expert MLPs over all devices (forward and backward):
    4 * width * hidden per routed token and MoE block forward, times top_k tokens, times 3.
    0 for a dense model or the capacity path (whose einsums XLA counts)."""
    from facemoe_jax.models.swin import stage_resolutions
    from facemoe_jax.models.vit import parse_moe_layers

    if model_cfg.moe_layers == "none" or model_cfg.capacity_factor:
        return 0.0
    grid = model_cfg.image_size // model_cfg.patch_size
    if model_cfg.name == "swin_moe":
        depths = tuple(model_cfg.depths)
        stage_of = [s for s, depth in enumerate(depths) for _ in range(depth)]
        sides = stage_resolutions(grid, len(depths))
        blocks = parse_moe_layers(model_cfg.moe_layers, sum(depths))
        shapes = [(sides[stage_of[b]] ** 2, model_cfg.width * 2 ** stage_of[b]) for b in blocks]
    elif model_cfg.name == "vit_moe":
        blocks = parse_moe_layers(model_cfg.moe_layers, model_cfg.depth)
        shapes = [(grid**2, model_cfg.width)] * len(blocks)
    else:
        return 0.0
    forward = sum(
        tokens * model_cfg.top_k * 4 * width * width * model_cfg.mlp_ratio
        for tokens, width in shapes
    )
    return 3.0 * batch_size * forward


@dataclasses.dataclass
class Roofline:
    compute_seconds: float
    memory_seconds: float
    bound_seconds: float
    images_per_second_bound: float
    images_per_second_at_mfu: float


def roofline(
    flops_per_chip: float,
    bytes_per_chip: float,
    peak_flops: float,
    bandwidth: float,
    global_batch: int,
    mfu: float = MFU_FOR_THROUGHPUT,
) -> Roofline:
    """The step time no chip can beat (compute at peak, or every byte at full HBM bandwidth,
    whichever takes longer), and the images/s it and `mfu` imply for the global batch."""
    compute = flops_per_chip / peak_flops
    memory = bytes_per_chip / bandwidth
    bound = max(compute, memory)
    at_mfu = global_batch * mfu * peak_flops / flops_per_chip if flops_per_chip else 0.0
    return Roofline(compute, memory, bound, global_batch / bound if bound else 0.0, at_mfu)


def mesh_candidates(num_devices: int, num_experts: int, dense: bool) -> list[tuple[int, int]]:
    """Every (data, expert) split of the devices the MoE layers allow, the most expert-sharded
    first (the experts and the class centres are what shrinks per device)."""
    if dense:
        return [(num_devices, 1)]
    experts = [e for e in range(1, num_devices + 1) if num_devices % e == 0]
    allowed = [e for e in experts if num_experts % e == 0 or e % num_experts == 0]
    return [(num_devices // e, e) for e in sorted(allowed, reverse=True)]


def out_of_memory(error: Exception) -> str | None:
    """XLA's refusal to compile a program too large for a device's HBM, as one line (the
    TPU compiler checks this itself); None for any other error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text or "memory" not in text.lower():
        return None
    return messages.one_line(text[text.index("RESOURCE_EXHAUSTED") :])


def compiled_memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
        + m.generated_code_size_in_bytes
    )
    return {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
        "total": int(total),
    }


def program_cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
