r"""The AOT table of docs/scale_out.md: `python -m facemoe_jax.aot` over configs and TPU topologies.

  FACEMOE_LIBTPU_DIR=DIR python -m benchmarks.aot_table [--cells vit_b_206k@v5p-8,...] \
      [--out benchmarks/results/aot] [--jobs 1]
  python -m benchmarks.aot_table --render [--out benchmarks/results/aot]

Each cell (a config at a class count, on a slice) is compiled by the aot command in a process of
its own and its report kept as `<out>/<config>@<slice>.json` next to its printed text; a cell
whose JSON exists is not compiled again, so the table fills over several runs (a full-depth
compile took 8-24 minutes on 2 CPU cores). `--render` prints the markdown table from whatever
cells exist, the missing ones marked as such. Every cell trains in bf16 at global batch 1024.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time

CONFIGS = {
    "vit_b_206k": ("configs/vit_b_moe.py", ["--config.model.dtype=bfloat16"]),
    "vit_b_2m": (
        "configs/vit_b_moe.py",
        ["--config.model.dtype=bfloat16", "--config.data.synthetic_identities=2000000"],
    ),
    "swin_moe_120": ("configs/swin_moe_120.py", ["--config.model.dtype=bfloat16"]),
}
# Slices by their Cloud names (v4 and v5p count TensorCores, v5e and v6e chips) and the topology
# libtpu knows them by.
SLICES = {
    "v4-8": "v4:2x2x1",
    "v5e-16": "v5e:4x4",
    "v5p-8": "v5p:2x2x1",
    "v5p-64": "v5p:4x4x2",
    "v6e-16": "v6e:4x4",
}
LABELS = {
    "vit_b_206k": "ViT-B/9-MoE, 205,990 classes",
    "vit_b_2m": "ViT-B/9-MoE, 2,000,000 classes",
    "swin_moe_120": "Swin-MoE-120, 205,990 classes",
}
GiB = 2**30


def cell_path(out: str, config: str, slice_name: str) -> str:
    return os.path.join(out, f"{config}@{slice_name}.json")


def command(config: str, slice_name: str, json_path: str) -> list[str]:
    path, overrides = CONFIGS[config]
    return [
        sys.executable,
        "-m",
        "facemoe_jax.aot",
        f"--config={path}",
        f"--topology={SLICES[slice_name]}",
        f"--json={json_path}",
        *overrides,
    ]


def compile_cell(out: str, config: str, slice_name: str) -> str:
    json_path = cell_path(out, config, slice_name)
    if os.path.exists(json_path):
        return f"{config}@{slice_name}: kept"
    start = time.perf_counter()
    done = subprocess.run(command(config, slice_name, json_path), capture_output=True, text=True)
    with open(json_path[: -len(".json")] + ".txt", "w") as f:
        f.write(" ".join(command(config, slice_name, json_path)[1:]) + "\n")
        f.write(done.stdout + done.stderr)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return f"{config}@{slice_name}: FAILED ({done.returncode}) after {seconds:.0f} s"
    return f"{config}@{slice_name}: {seconds:.0f} s"


def render(out: str) -> str:
    rows = [
        "| config | slice (chips) | fits? | HBM per chip | step bound | bound by | img/s at bound"
        " | img/s at 50 % MFU | per chip: img/s at bound / at 50 % MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        for slice_name in SLICES:
            path = cell_path(out, config, slice_name)
            if not os.path.exists(path):
                rows.append(f"| {LABELS[config]} | {slice_name} | not compiled yet | | | | | | |")
                continue
            with open(path) as f:
                r = json.load(f)
            if "compile_error" in r:  # XLA refused the program: larger than a device's HBM
                needed = re.search(r"required for HLO temporaries \(([^)]+)\)", r["compile_error"])
                verdict = "**no**: XLA refused it" + (
                    f" (temporaries {needed.group(1)} per device)" if needed else ""
                )
                if "fitting_mesh" in r:
                    m = r["fitting_mesh"]
                    verdict += f"; fits at data={m['data']} x expert={m['expert']}"
                rows.append(
                    f"| {LABELS[config]} | {slice_name} ({r['chips']}) | {verdict} | "
                    f"> {r['hbm_bytes_per_chip'] / GiB:.0f} GiB | | | | | |"
                )
                continue
            rf = r["roofline"]
            total = r["memory_bytes_per_chip"]["total"]
            verdict = "yes" if r["fits"] else "**no**"
            if not r["fits"] and "fitting_mesh" in r:
                m = r["fitting_mesh"]
                verdict += f" (fits at data={m['data']} x expert={m['expert']})"
            bound_by = "memory" if rf["memory_seconds"] >= rf["compute_seconds"] else "compute"
            at_mfu = rf["images_per_second_at_mfu"]
            reachable = at_mfu <= rf["images_per_second_bound"]
            mfu_cell = f"{at_mfu:,.0f}" + ("" if reachable else " (beyond the bound)")
            rows.append(
                f"| {LABELS[config]} | {slice_name} ({r['chips']}) | {verdict} | "
                f"{total / GiB:.1f} of {r['hbm_bytes_per_chip'] / GiB:.0f} GiB | "
                f"{rf['bound_seconds'] * 1e3:,.0f} ms | {bound_by} | "
                f"{rf['images_per_second_bound']:,.0f} | {mfu_cell} | "
                f"{rf['images_per_second_bound'] / r['chips']:,.0f} / {at_mfu / r['chips']:,.0f} |"
            )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/aot")
    parser.add_argument("--cells", default="", help="config@slice,... (default: every cell)")
    parser.add_argument("--jobs", type=int, default=1, help="compiles at once")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    if args.render:
        print(render(args.out))
        return
    cells = [tuple(c.split("@")) for c in args.cells.split(",") if c] or [
        (config, slice_name) for config in CONFIGS for slice_name in SLICES
    ]
    for cell in cells:
        if len(cell) != 2 or cell[0] not in CONFIGS or cell[1] not in SLICES:
            parser.error(
                f"--cells: {'@'.join(cell)!r} is not config@slice with config in "
                f"{sorted(CONFIGS)} and slice in {sorted(SLICES)}"
            )
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: need at least 1")
    os.makedirs(args.out, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda c: compile_cell(args.out, *c), cells):
            print(line, flush=True)


if __name__ == "__main__":
    main()
