r"""Per-device memory of the ViT-B-MoE train step on 8 (fake CPU) devices, over meshes and class
counts: class centres and experts fall as 1 / shards.

  python -m benchmarks.scaling [--classes 200000,2000000] [--depth 2] [--batch 64]

For each class count and mesh (data x expert = 8x1, 4x2, 2x4, 1x8):
  * parameter + optimiser bytes per device of the *full* configs/vit_b_moe.py model (depth 24),
    from the sharding rules (no memory is allocated: abstract shapes only), split into class
    centres, experts and the rest;
  * the compiled train step's per-device memory (`memory_analysis()`: arguments, outputs,
    temporaries) of the same model cut to --depth blocks (the full depth compiles for minutes on
    2 cores; every block adds the same per-device bytes on every mesh).
Ends with one JSON line; "ratio" = centre bytes per device on 1x8 over 8x1 at the largest class
count (1.0: the centres are split over all 8 devices on every mesh).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + os.environ.get(
    "XLA_FLAGS", ""
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from facemoe_jax.aot import compile as aot_compile  # noqa: E402
from facemoe_jax.aot import cost  # noqa: E402
from facemoe_jax.parallel import mesh as mesh_lib  # noqa: E402

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
GB = 2**30


def vit_b_config(num_classes: int, depth: int | None, mesh: tuple[int, int]):
    spec = importlib.util.spec_from_file_location("vit_b_moe", "configs/vit_b_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.num_classes = num_classes
    config.mesh.update(data=mesh[0], expert=mesh[1])
    if depth is not None:
        config.model.depth = depth
    return config


def compiled_memory(config, mesh, batch_size) -> tuple[dict[str, float], float]:
    """GiB per device of the compiled train step (arguments, outputs, temporaries, aliased)."""
    start = time.perf_counter()
    compiled = aot_compile.compile_train_step(config, mesh, batch_size)[0]
    seconds = time.perf_counter() - start
    memory = cost.compiled_memory(compiled)
    keys = ("arguments", "outputs", "temporaries", "aliased")
    return {k: memory[k] / GB for k in keys}, seconds


def state_bytes_per_device(state) -> dict[str, float]:
    """GiB per device of params + optimiser state, by kind (centres, experts, rest)."""
    split = cost.state_bytes_by_kind(state)
    return {k: (split["params"][k] + split["optimizer"][k]) / GB for k in split["params"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="200000,2000000")
    parser.add_argument("--depth", type=int, default=2, help="blocks of the compiled model")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    args = parser.parse_args()
    print(
        f"{jax.device_count()} {jax.devices()[0].platform} devices; ViT-B-MoE "
        "(configs/vit_b_moe.py); GiB per device"
    )
    results = {}
    for classes in [int(c) for c in args.classes.split(",")]:
        for shape in MESHES:
            full = vit_b_config(classes, None, shape)
            mesh = mesh_lib.make_mesh(full.mesh)
            state = aot_compile.abstract_sharded_state(full, mesh)[3]
            params = state_bytes_per_device(state)
            cut = vit_b_config(classes, args.depth, shape)
            memory, seconds = compiled_memory(cut, mesh, args.batch)
            key = f"{classes}/{shape[0]}x{shape[1]}"
            results[key] = {
                "state_gib_full_depth": {k: round(v, 4) for k, v in params.items()},
                f"compiled_gib_depth_{args.depth}": {k: round(v, 4) for k, v in memory.items()},
                "compile_s": round(seconds, 1),
            }
            print(
                f"{classes:>8} classes, mesh {shape[0]}x{shape[1]}: state (depth 24) centres "
                f"{params['centres']:6.3f} experts {params['experts']:6.3f} rest "
                f"{params['rest']:6.3f} | compiled step (depth {args.depth}) args "
                f"{memory['arguments']:6.3f} temp {memory['temporaries']:6.3f} out "
                f"{memory['outputs']:6.3f} ({seconds:.0f} s compile)",
                flush=True,
            )
    largest = max(int(c) for c in args.classes.split(","))
    ratio = (
        results[f"{largest}/1x8"]["state_gib_full_depth"]["centres"]
        / results[f"{largest}/8x1"]["state_gib_full_depth"]["centres"]
    )
    print(json.dumps({"results": results, "ratio": round(ratio, 4)}))


if __name__ == "__main__":
    main()
