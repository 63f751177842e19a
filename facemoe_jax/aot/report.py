"""The AOT report of a config on a TPU topology: compiled, measured, and printed."""

from __future__ import annotations

import dataclasses
import time

from facemoe_jax.aot.compile import abstract_sharded_state, compile_embed_step, compile_train_step
from facemoe_jax.aot.cost import (
    MFU_FOR_THROUGHPUT,
    compiled_memory,
    dropless_expert_flops,
    mesh_candidates,
    out_of_memory,
    program_cost,
    roofline,
    state_bytes_by_kind,
)
from facemoe_jax.aot.topology import AotError, topology_devices
from facemoe_jax.core import messages

GiB = 2**30


def report(config, topology: str, embed_batch: int = 0, search: bool = True) -> dict:
    """Compiles config's train and embedding steps for the topology; the report as a dict."""

    from facemoe_jax.data import sources
    from facemoe_jax.parallel import chips
    from facemoe_jax.parallel import mesh as mesh_lib
    from facemoe_jax.parallel import sharding
    from facemoe_jax.train import objectives as objectives_lib

    devices = topology_devices(topology)
    kind = devices[0].device_kind
    chip = chips.chip_of(kind)
    if chip is None:
        raise AotError(f"--topology={topology}: no data sheet for {kind!r} (parallel/chips.py)")
    per_chip = chips.devices_per_chip(devices)
    num_chips = len(devices) // per_chip
    objectives_lib.check_config(config)
    try:
        config = sources.with_data_counts(config)
    except (OSError, ValueError) as e:
        raise AotError(
            f"{messages.one_line(e)}; give the class count with --config.data.num_classes=N"
        ) from None

    def compile_on(shape):
        candidate = config.copy_and_resolve_references()
        candidate.mesh.update(data=shape[0], expert=shape[1])
        mesh = mesh_lib.make_mesh(candidate.mesh, devices=devices)
        mesh_lib.check_batch_size(candidate.train.batch_size, mesh)
        sharding.check_config(candidate, mesh)
        start = time.perf_counter()
        compiled, state, model = compile_train_step(candidate, mesh)
        return compiled, state, model, mesh, time.perf_counter() - start

    def search_meshes(skip) -> tuple[list, dict | None]:
        """Every other data x expert split, compiled until one fits: (what each gave, the
        fitting mesh or None)."""
        tried = []
        dense = config.model.moe_layers == "none"
        for shape in mesh_candidates(len(devices), int(config.model.num_experts), dense):
            if shape == tuple(skip):
                continue
            try:
                candidate = compile_on(shape)[0]
            except ValueError as e:  # the batch or the experts do not split this way
                tried.append({"mesh": shape, "error": messages.one_line(e)})
                continue
            except Exception as e:  # noqa: BLE001 - XLA's refusal is a verdict, not a failure
                refused = out_of_memory(e)
                if refused is None:
                    raise
                tried.append({"mesh": shape, "error": refused})
                continue
            total = compiled_memory(candidate)["total"] * per_chip
            tried.append({"mesh": shape, "total_bytes_per_chip": total})
            if total <= chip.hbm_bytes:
                return tried, {"data": shape[0], "expert": shape[1]}
        return tried, None

    mesh_shape = mesh_lib.mesh_shape(config.mesh, len(devices))

    def described(state) -> dict:
        """What was compiled, for what, and the state each chip holds."""
        return {
            "config": {
                "model": config.model.name,
                "classes": int(config.data.num_classes),
                "batch": int(config.train.batch_size),
                "dtype": config.model.dtype,
                "experts": int(config.model.num_experts),
            },
            "topology": topology,
            "chip": dataclasses.asdict(chip),
            "chips": num_chips,
            "devices_per_chip": per_chip,
            "mesh": {"data": mesh_shape[0], "expert": mesh_shape[1]},
            "state_bytes_per_chip": {
                part: {k: v * per_chip for k, v in kinds.items()}
                for part, kinds in state_bytes_by_kind(state).items()
            },
            "hbm_bytes_per_chip": chip.hbm_bytes,
        }

    try:
        compiled, state, model, mesh, seconds = compile_on(mesh_shape)
    except Exception as e:  # noqa: BLE001
        refused = out_of_memory(e)
        if refused is None:
            raise
        # XLA will not build a program that cannot fit one device: that is the verdict.
        refused_config = config.copy_and_resolve_references()
        refused_config.mesh.update(data=mesh_shape[0], expert=mesh_shape[1])
        mesh = mesh_lib.make_mesh(refused_config.mesh, devices=devices)
        state = abstract_sharded_state(refused_config, mesh)[3]
        out = {
            **described(state),
            "fits": False,
            "compile_error": refused,
            "search": [],
            "searched": bool(search),
        }
        if search:
            out["search"], fitting = search_meshes(mesh_shape)
            if fitting:
                out["fitting_mesh"] = fitting
        return out
    memory = compiled_memory(compiled)
    total_chip = memory["total"] * per_chip
    fits = total_chip <= chip.hbm_bytes
    xla_flops, bytes_accessed = program_cost(compiled)
    added = dropless_expert_flops(config.model, config.train.batch_size) / len(devices)
    flops_chip, bytes_chip = (xla_flops + added) * per_chip, bytes_accessed * per_chip
    bound = roofline(
        flops_chip,
        bytes_chip,
        chip.peak_bf16_flops,
        chip.hbm_bytes_per_second,
        config.train.batch_size,
    )
    out = {
        **described(state),
        "compile_seconds": round(seconds, 1),
        "memory_bytes_per_chip": {k: v * per_chip for k, v in memory.items()},
        "fits": fits,
        "flops_per_chip_xla": xla_flops * per_chip,
        "flops_per_chip": flops_chip,
        "dropless_expert_flops_added_per_chip": added * per_chip,
        "hbm_bytes_accessed_per_chip": bytes_chip,
        "arithmetic_intensity": flops_chip / bytes_chip if bytes_chip else 0.0,
        "roofline": dataclasses.asdict(bound),
        "mfu_for_throughput": MFU_FOR_THROUGHPUT,
    }
    batch = embed_batch or config.train.batch_size
    embed_compiled = compile_embed_step(config, mesh, model, state, batch)
    embed_flops, embed_bytes = program_cost(embed_compiled)
    embed_bound = roofline(
        embed_flops * per_chip,
        embed_bytes * per_chip,
        chip.peak_bf16_flops,
        chip.hbm_bytes_per_second,
        batch,
    )
    out["embed"] = {
        "batch": batch,
        "memory_bytes_per_chip": {
            k: v * per_chip for k, v in compiled_memory(embed_compiled).items()
        },
        "flops_per_chip": embed_flops * per_chip,
        "roofline": dataclasses.asdict(embed_bound),
    }
    out["search"], out["searched"] = [], bool(search and not fits)
    if not fits and search:
        out["search"], fitting = search_meshes(mesh_shape)
        if fitting:
            out["fitting_mesh"] = fitting
    return out


def _gib(value: float) -> str:
    """Bytes in GiB, or MiB below 1 GiB (a small model's report is not all zeros)."""
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / 2**20:.1f} MiB"


def _compiled_lines(r: dict) -> list[str]:
    """The report's memory, FLOPs, roofline and embedding lines of a compiled train step."""
    chip, m = r["chip"], r["memory_bytes_per_chip"]
    rf, ef = r["roofline"], r["embed"]["roofline"]
    return [
        f"  compiled     arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
        f"({_gib(m['aliased'])} of them donated), temporaries {_gib(m['temporaries'])}",
        f"  total        {_gib(m['total'])} of {_gib(r['hbm_bytes_per_chip'])}: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"FLOPs per step per chip {r['flops_per_chip'] / 1e12:.3f} T (XLA "
        f"{r['flops_per_chip_xla'] / 1e12:.3f} T + dropless experts "
        f"{r['dropless_expert_flops_added_per_chip'] / 1e12:.3f} T); HBM bytes accessed "
        f"{_gib(r['hbm_bytes_accessed_per_chip'])}; arithmetic intensity "
        f"{r['arithmetic_intensity']:.0f} FLOP/byte",
        f"roofline: compute {rf['compute_seconds'] * 1e3:.2f} ms at "
        f"{chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s, memory {rf['memory_seconds'] * 1e3:.2f} "
        f"ms at {chip['hbm_bytes_per_second'] / 1e9:.0f} GB/s -> step >= "
        f"{rf['bound_seconds'] * 1e3:.2f} ms, <= {rf['images_per_second_bound']:,.0f} images/s; "
        f"{rf['images_per_second_at_mfu']:,.0f} images/s at "
        f"{r['mfu_for_throughput']:.0%} MFU"
        + (
            " (beyond the memory bound: not reachable)"
            if rf["images_per_second_at_mfu"] > rf["images_per_second_bound"]
            else ""
        )
        + f" ({chip['source']})",
        f"embedding step (batch {r['embed']['batch']}): "
        f"{r['embed']['flops_per_chip'] / 1e9:.1f} GFLOP per chip, "
        f"{_gib(r['embed']['memory_bytes_per_chip']['total'])} per chip, <= "
        f"{ef['images_per_second_bound']:,.0f} images/s",
    ]


def format_report(r: dict) -> str:
    c, chip, state = r["config"], r["chip"], r["state_bytes_per_chip"]
    kinds = ("centres", "experts", "rest")
    refused = r.get("compile_error")
    lines = [
        f"{c['model']} ({c['classes']:,} classes, global batch {c['batch']}, {c['dtype']}) on "
        f"{r['topology']}: {r['chips']} x {chip['name']} ({r['devices_per_chip']} device(s) per "
        f"chip), mesh data={r['mesh']['data']} x expert={r['mesh']['expert']}; train step "
        + ("not compiled" if refused else f"compiled in {r['compile_seconds']:.0f} s"),
        "HBM per chip:",
        "  parameters   " + ", ".join(f"{k} {_gib(state['params'][k])}" for k in kinds),
        "  optimiser    " + ", ".join(f"{k} {_gib(state['optimizer'][k])}" for k in kinds),
    ]
    if refused:
        lines += [
            f"  compiled     XLA refused the program: {refused}",
            f"  total        more than {_gib(r['hbm_bytes_per_chip'])}: DOES NOT FIT",
        ]
    else:
        lines += _compiled_lines(r)
    for tried in r["search"]:
        data, expert = tried["mesh"]
        if "error" in tried:
            lines.append(f"  mesh data={data} x expert={expert}: {tried['error']}")
        else:
            lines.append(
                f"  mesh data={data} x expert={expert}: {_gib(tried['total_bytes_per_chip'])}"
            )
    if not r["fits"] and "fitting_mesh" in r:
        f = r["fitting_mesh"]
        lines.append(f"fits with --config.mesh.data={f['data']} --config.mesh.expert={f['expert']}")
    elif not r["fits"] and r["search"]:
        lines.append("no data x expert mesh of these chips fits: more chips or a smaller batch")
    elif not r["fits"] and r.get("searched"):
        lines.append(
            "no other data x expert split of these devices (the expert axis must divide "
            f"{r['config'].get('experts', 'the')} experts): more chips or a smaller batch"
        )
    return "\n".join(lines)
