r"""Ahead-of-time compilation for a TPU topology, on any machine: does a config fit, and what does
a step cost?

  python -m facemoe_jax.aot --config configs/vit_b_moe.py --topology v5p:2x2x1 \
      [--config.<field>=...] [--embed_batch N] [--json report.json] [--no_search]

The full train step of the config (the one `python -m facemoe_jax.main` runs: model, objectives,
optimiser, sharding rules, mesh) and its embedding step are compiled by XLA for the topology's
chips, as MaxText's train_compile.py does; nothing runs and no data is read (a synthetic set's
class count is its `synthetic_identities`; give a real set's with --config.data.num_classes).
It prints, per chip:
  * HBM: parameters and optimiser state split into class centres, experts and the rest (from
    the sharding rules), the step's temporaries, and the total against the chip's capacity:
    fits or does not fit;
  * FLOPs per step and HBM bytes accessed (XLA's cost analysis of the partitioned program) and
    their ratio, the arithmetic intensity;
  * the roofline bound on the step time, max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth),
    the images/s that bound allows, and the images/s at 50 % MFU;
  * when it does not fit, the data x expert mesh over the same chips that does (each candidate
    compiled; none found is said).

XLA counts a loop body once, whatever its trip count: the dropless MoE's expert MLPs run in
loops (kernels/grouped_matmul.py), so their FLOPs are added analytically (4 * width * hidden
per routed token and MoE block forward, three times that for forward and backward); the report
shows both figures.

It needs libtpu, which `pip install "facemoe_jax[tpu-aot]"` brings. Installed that way, every
`import jax` of that environment prints TPU start-up lines on stderr, so the other way is to keep
it apart: `pip install --target DIR libtpu==0.0.42.1` and `FACEMOE_LIBTPU_DIR=DIR`; only this
command then sees it. Either way the command keeps libtpu's start-up lines off stderr (they are
shown when the topology cannot be made). Chip figures: parallel/chips.py; docs/scale_out.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Nothing runs: the host CPU backend traces and compiles; an attached accelerator stays free.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from facemoe_jax.core import cli, messages  # noqa: E402

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PROJECT_ROOT not in sys.path:
    sys.path.insert(0, _PROJECT_ROOT)

LIBTPU_DIR_ENV = "FACEMOE_LIBTPU_DIR"
LIBTPU_VERSION = "0.0.42.1"  # the libtpu that jax[tpu]==0.10.2 pins
MFU_FOR_THROUGHPUT = 0.5
GiB = 2**30


class AotError(ValueError):
    """A mistake the user can fix (no libtpu, an unknown topology, a config that cannot compile)."""


# ---- libtpu and the topology


def use_libtpu() -> None:
    """Makes libtpu importable: installed in this environment, or the pip --target directory
    named by $FACEMOE_LIBTPU_DIR (put first on sys.path for this process only)."""
    folder = os.environ.get(LIBTPU_DIR_ENV, "")
    if folder:
        if not os.path.isdir(os.path.join(folder, "libtpu")):
            raise AotError(f"{LIBTPU_DIR_ENV}={folder} holds no libtpu package")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    # libtpu's lockfile guards a host's real chips; compiling for a described topology touches
    # none, and the lock would only keep a second compile (or a test worker) from starting.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(
            'compiling for a TPU topology needs libtpu: pip install "facemoe_jax[tpu-aot]", or '
            f"pip install --target DIR libtpu=={LIBTPU_VERSION} and {LIBTPU_DIR_ENV}=DIR"
        )


@contextlib.contextmanager
def _stderr_captured():
    """Holds what the process writes to file descriptor 2 (libtpu's C++ start-up lines) in a
    file; yields a function that returns it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield lambda: (held.seek(0), held.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as "v5p:2x2x1" or "v5e:4x4", with libtpu's start-up
    lines kept off stderr."""
    from jax.experimental import topologies

    use_libtpu()
    with _stderr_captured() as held:
        try:
            return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
        except Exception as e:  # libtpu's own errors; its lines say why
            lines = [line for line in held().splitlines() if line.strip()][-3:]
            raise AotError(
                f"--topology={name}: {messages.one_line(e)}"
                + (f" (libtpu: {' | '.join(lines)})" if lines else "")
            ) from None


# ---- what the state holds, per device


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


# ---- compiling


def abstract_sharded_state(config, mesh):
    """(model, optimizer, schedule, state of sharded ShapeDtypeStructs, their shardings)."""
    import jax

    from facemoe_jax.models import build_model
    from facemoe_jax.parallel import sharding
    from facemoe_jax.train import optimizer as optimizer_lib
    from facemoe_jax.train import state as state_lib

    model = build_model(config.model)
    optimizer, schedule = optimizer_lib.build_optimizer(
        config.optimizer, config.train.num_steps, config.train.trainable
    )
    abstract = state_lib.abstract_train_state(model, optimizer, config)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return model, optimizer, schedule, state, shardings


def _no_frozen_inputs(path, *args, **kwargs):
    raise AotError(
        f"an objective of this config loads {path!r} (a teacher): the AOT report compiles "
        "configs without frozen inputs; leave the distillation out (--config.distill.teacher=)"
    )


def compile_train_step(config, mesh, batch_size: int = 0):
    """(the compiled train step, the abstract state, the model) of `config` on `mesh`, for a
    global batch of `batch_size` (0: config.train.batch_size)."""
    import jax
    import jax.numpy as jnp

    from facemoe_jax.parallel import mesh as mesh_lib
    from facemoe_jax.train import objectives as objectives_lib
    from facemoe_jax.train import step as step_lib

    model, optimizer, schedule, state, shardings = abstract_sharded_state(config, mesh)
    resources = objectives_lib.Resources(mesh=mesh, load_variables=_no_frozen_inputs)
    objectives = objectives_lib.build(config, resources)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    size, batch = config.model.image_size, batch_size or config.train.batch_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=batch_sharding)
    spec = {
        "image": images,
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding),
    }
    for key in objectives_lib.batch_keys(objectives):
        if key != "image_hr":
            raise AotError(f"an objective needs the batch entry {key!r}, unknown to the AOT report")
        spec[key] = images
    step = jax.jit(
        step_lib.make_train_step(model, config, optimizer, schedule, objectives),
        donate_argnums=0,
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
    )
    with jax.set_mesh(mesh):
        return step.lower(state, spec, {}).compile(), state, model


def compile_embed_step(config, mesh, model, state, batch_size: int):
    """The compiled embedding step (evaluation's: flip test as config.eval.flip_test) on a
    batch of `batch_size` uint8 images split over the mesh."""
    import jax
    import jax.numpy as jnp

    from facemoe_jax.evaluate import embed
    from facemoe_jax.parallel import mesh as mesh_lib

    variables = {"params": state.params["encoder"]}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    size = config.model.image_size
    images = jax.ShapeDtypeStruct(
        (batch_size, size, size, 3), jnp.uint8, sharding=mesh_lib.batch_sharding(mesh)
    )
    jitted = embed.make_embed_fn(model, flip_test=config.eval.flip_test).jitted
    with jax.set_mesh(mesh):
        return jitted.lower(variables, images).compile()


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


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


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
    xla_flops, bytes_accessed = _cost(compiled)
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
    embed_flops, embed_bytes = _cost(embed_compiled)
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


# ---- the printed report


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


def define_flags() -> dict:
    """The command's flags (defined when it runs, not on import: main.py defines --config too)."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py)."),
        "topology": flags.DEFINE_string("topology", None, 'TPU topology, e.g. "v5p:2x2x1".'),
        "embed_batch": flags.DEFINE_integer("embed_batch", 0, "Embedding batch (0: train batch)."),
        "json": flags.DEFINE_string("json", None, "Also write the report to this JSON file."),
        "search": flags.DEFINE_bool(
            "search", True, "When it does not fit, search a mesh that does."
        ),
    }


def main(argv, options: dict) -> dict:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config, topology = options["config"].value, options["topology"].value
    if config is None or not topology:
        cli.fail("both --config and --topology are required")
    try:
        result = report(config, topology, options["embed_batch"].value, options["search"].value)
    except ValueError as e:
        cli.fail(str(e.args[0]) if e.args else repr(e))
    print(format_report(result), flush=True)
    if options["json"].value:
        with open(options["json"].value, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    options = define_flags()
    main(cli.parse_flags(sys.argv), options)
