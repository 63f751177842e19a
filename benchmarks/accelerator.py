r"""The first run on an accelerator: the demo, the two MoE train steps against their PyTorch twins
with MFU, and embedding throughput; one JSON line at the end. `benchmarks/accelerator.sh` installs
JAX's GPU plugin first and then runs this.

  python -m benchmarks.accelerator [--size auto|small|full] [--steps N] [--demo-steps N]

--size auto (the default) is `full` when JAX's default backend is a GPU or TPU and `small` on a
CPU, where the same parts run at sizes that finish in minutes (so the script stays tested):

  part           full (accelerator)                          small (CPU)
  demo           configs/demo.py with its own defaults       the same, --demo-steps steps (60)
  train steps    ViT-B/9-MoE (width 512, depth 24, E=8,      ViT-MoE /14, width 96, depth 2;
                 k=2) at 128 per device, the official        Swin-MoE width 48, depths 2/2/2;
                 Swin-MoE (384, 2/18/2, E=3, k=2) at 128     batch 8 each
  embedding      both models, batch 256, no flip            batch 16

Each train step is the benchmarks/train_step.py one: forward, backward, AdamW, CosFace m=0.4
(s=64) over 1,000 classes, the official router losses (lambda_aux 10), clip 5, in bf16 (ours:
`config.model.dtype="bfloat16"`, parameters and losses float32; PyTorch: autocast to bfloat16,
the classifier in float32). PyTorch runs the official routing (`interop/torch_models.py`) on the
same device kind. Every measured part runs in a process of its own, so that JAX's preallocated
GPU memory and PyTorch's caching allocator never share a device, and one part's failure is
reported in the JSON instead of ending the run.

MFU = (XLA's counted FLOPs + the dropless experts' FLOPs, which XLA counts once per loop) /
step time / the device's peak (parallel/chips.py: the data-sheet bf16 peak of a GPU or TPU;
on a CPU, the measured float32 matmul peak of this host).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODELS = ("vit", "swin")
BATCH = {"full": {"train": 128, "embed": 256}, "small": {"train": 8, "embed": 16}}
DEMO_STEPS_SMALL = 60


def default_size() -> str:
    import jax

    return "full" if jax.default_backend() in ("gpu", "tpu") else "small"


def train_config(model_name: str, size: str):
    from benchmarks import train_step

    config = train_step.small_config(model_name, full=size == "full", precision="bf16")
    if size == "small":  # fewer and narrower blocks: the CPU run is a test, not a measurement
        if model_name == "vit":
            config.model.update(width=96, depth=2, num_heads=4, patch_size=14)
        else:
            config.model.update(width=48)
    return config


def step_figures(step_s: float, batch: int, flops: float) -> dict:
    from facemoe_jax.train import mfu as mfu_lib

    peak, source = mfu_lib.peak_flops_per_device()
    return {
        "batch": batch,
        "step_ms": round(step_s * 1e3, 2),
        "img_s": round(batch / step_s, 2),
        "tflop_per_step": round(flops / 1e12, 4),
        "mfu": round(mfu_lib.mfu(flops, 1.0 / step_s, peak), 4),
        "peak_tflops": round(peak / 1e12, 2),
        "peak_source": source,
    }


def part_ours(model_name: str, size: str, steps: int) -> dict:
    import jax

    from benchmarks import train_step
    from facemoe_jax.aot import cost

    config = train_config(model_name, size)
    batch = BATCH[size]["train"]
    run, compile_s, gflop, _ = train_step.make_ours(config, batch)
    step_s = train_step._time_steps(run, steps)
    flops = gflop * 1e9 + cost.dropless_expert_flops(config.model, batch)
    figures = step_figures(step_s, batch, flops)
    figures.update(compile_s=round(compile_s, 1), device=jax.devices()[0].device_kind)
    return figures


def part_pytorch(model_name: str, size: str, steps: int) -> dict:
    import torch

    from benchmarks import train_step

    import jax

    backend = jax.default_backend()
    if backend == "gpu" and not torch.cuda.is_available():
        return {
            "skipped": f"torch {torch.__version__} has no CUDA; install a CUDA build to compare"
        }
    if backend == "tpu":
        return {"skipped": "no PyTorch twin on TPU"}
    device = "cuda" if backend == "gpu" else "cpu"
    config = train_config(model_name, size)
    batch = BATCH[size]["train"]
    run = train_step.make_torch(config, batch, os.cpu_count(), device=device)
    step_s = train_step._time_steps(run, steps)
    return {
        "batch": batch,
        "step_ms": round(step_s * 1e3, 2),
        "img_s": round(batch / step_s, 2),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def part_embed(model_name: str, size: str, steps: int) -> dict:
    import jax
    import numpy as np

    from benchmarks.inference import random_variables
    from facemoe_jax.encoder import FaceEncoder

    config = train_config(model_name, size)
    batch = BATCH[size]["embed"]
    encoder = FaceEncoder(config, random_variables(config))
    side = config.model.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), np.uint8)
    start = time.perf_counter()
    encoder.embed(images, flip_test=False, normalize=False, batch_size=batch)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(max(steps, 3)):
        start = time.perf_counter()
        encoder.embed(images, flip_test=False, normalize=False, batch_size=batch)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {
        "batch": batch,
        "img_s": round(batch / median, 1),
        "first_call_s": round(compile_s, 1),
        "device": jax.devices()[0].device_kind,
    }


PARTS = {"ours": part_ours, "pytorch": part_pytorch, "embed": part_embed}


def failure(done: subprocess.CompletedProcess) -> str:
    """A failed child process as one line: its exit status and its last three stderr lines."""
    return f"exit {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:])


def run_part(kind: str, model_name: str, size: str, steps: int) -> dict:
    """One part in a fresh process; its JSON, or {"error": ...} with the tail of its stderr."""
    command = [sys.executable, "-m", "benchmarks.accelerator", "--part", f"{kind}:{model_name}"]
    command += ["--size", size, "--steps", str(steps)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": failure(done)}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - start, 1)
    return out


def run_demo(size: str, demo_steps: int, workdir: str) -> dict:
    """configs/demo.py through the real entry point; its evaluation figures and wall time."""
    command = [sys.executable, "-m", "facemoe_jax.main", "--config", "configs/demo.py"]
    command += ["--workdir", workdir]
    if size == "small":
        command.append(f"--config.train.num_steps={demo_steps}")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {"error": failure(done), "wall_s": wall}
    out = {"wall_s": wall, "steps": demo_steps if size == "small" else "config"}
    results_path = os.path.join(workdir, "eval", "results.json")
    try:
        with open(results_path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        return {**out, "error": f"{results_path}: {e}"}
    out["results"] = {
        name: round(v["accuracy"] if "accuracy" in v else v["rank1"], 4)
        for name, v in results.items()
        if isinstance(v, dict) and ("accuracy" in v or "rank1" in v)
    }
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("auto", "small", "full"), default="auto")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per train step")
    parser.add_argument("--demo-steps", type=int, default=DEMO_STEPS_SMALL, help="small size")
    parser.add_argument("--skip", default="", help="comma list of: demo, train, pytorch, embed")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("steps", "demo_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: need at least 1")
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {"demo", "train", "pytorch", "embed"}
    if unknown:
        parser.error(f"--skip {args.skip}: unknown part(s) {sorted(unknown)}")
    size = default_size() if args.size == "auto" else args.size
    if args.part:
        kind, model_name = args.part.split(":")
        print(json.dumps(PARTS[kind](model_name, size, args.steps)))
        return {}

    import jax

    summary = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "size": size,
    }
    print(f"JAX {jax.__version__}, backend {summary['backend']}: {summary['devices']}")
    print(f"size {size}", flush=True)
    start = time.perf_counter()
    if "demo" not in skip:
        with tempfile.TemporaryDirectory(prefix="accelerator_demo_") as workdir:
            summary["demo"] = run_demo(size, args.demo_steps, workdir)
        print(f"demo: {summary['demo']}", flush=True)
    for model_name in MODELS:
        entry = {}
        if "train" not in skip:
            entry["ours"] = run_part("ours", model_name, size, args.steps)
            print(f"{model_name} train step, ours: {entry['ours']}", flush=True)
        if "pytorch" not in skip:
            entry["pytorch"] = run_part("pytorch", model_name, size, args.steps)
            print(f"{model_name} train step, PyTorch: {entry['pytorch']}", flush=True)
        if "img_s" in entry.get("ours", {}) and "img_s" in entry.get("pytorch", {}):
            entry["ratio_ours_to_pytorch"] = round(
                entry["ours"]["img_s"] / entry["pytorch"]["img_s"], 3
            )
        if "embed" not in skip:
            entry["embed"] = run_part("embed", model_name, size, args.steps)
            print(f"{model_name} embedding: {entry['embed']}", flush=True)
        summary[model_name] = entry
    summary["total_s"] = round(time.perf_counter() - start, 1)
    failed = [
        f"{m}.{k}"
        for m in MODELS
        for k, v in summary.get(m, {}).items()
        if isinstance(v, dict) and "error" in v
    ] + (["demo"] if "error" in summary.get("demo", {}) else [])
    summary["failed"] = failed
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    summary = main()
    sys.exit(1 if summary.get("failed") else 0)
