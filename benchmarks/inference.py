r"""CPU inference: `FaceEncoder.embed` against onnxruntime running our own exported model.onnx,
the same images, batch and threads, measured side by side in one run.

  python -m benchmarks.inference [--models demo,r50] [--batch 64] [--threads 2] [--repeats 3]
      [--batches 4] [--in-process]

For each model (random weights with non-trivial BatchNorm statistics; speed does not depend on
their values): the JAX variables are exported with our exporter (`interop/onnx.py`, the
`--mode=export` path) to model.onnx, whose embeddings are checked against JAX's first. Then the
same `--batches` batches of uint8 RGB faces are embedded by
  * ours: `FaceEncoder.embed(images, flip_test=False, normalize=False, batch_size=B)`, the
    uint8 -> [-1, 1] conversion inside the compiled function, the model's own defaults
    (IResNets: Winograd 3x3 convolutions, `config.model.conv_algorithm`);
  * onnxruntime: the same conversion and NHWC -> NCHW in numpy (as a deployment does), then
    `InferenceSession.run` with `intra_op_num_threads=T`, `inter_op_num_threads=1`.
Each runtime runs alone in a process of its own, one after the other, `--repeats` rounds
(alternating; each process warms up on one batch, then passes over all the batches at least
twice and for at least `--min-seconds` (3), and reports the median pass), as each runs when
deployed.
`--in-process` times both in this one process instead, alternately, half that a turn
(the earlier method; benchmarks/RESULTS.md compares the two).
XLA:CPU's thread pool takes the process's cores; `--threads` should equal them (taskset the
process to compare at fewer). Reports the median images/s of each and ours / onnxruntime, then
one JSON line. "demo": configs/demo.py's ViT-MoE (48 px, capacity path); "r50": IResNet-50 at
112 px (configs/iresnet.py:r50). Both in float32, the exported graph's precision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks.train_step import load_config
from facemoe_jax.encoder import FaceEncoder
from facemoe_jax.interop import convert
from facemoe_jax.interop import onnx as onnx_export
from facemoe_jax.models import build_model

RUNTIMES = ("ours", "onnxruntime")
MODELS = {"demo": ("configs/demo.py", None), "r50": ("configs/iresnet.py", "r50")}


def random_variables(config, seed: int = 0) -> dict:
    """Initial parameters, with BatchNorm statistics moved off 0 / 1 (as after training)."""
    model = build_model(config.model)
    size = config.model.image_size
    variables = jax.jit(lambda r: model.init(r, np.zeros((1, size, size, 3)), train=False))(
        jax.random.PRNGKey(seed)
    )
    rng = np.random.default_rng(seed)

    def stats(path, x):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return (rng.uniform(0.5, 1.5, x.shape)).astype(x.dtype)
        return (rng.normal(0, 0.1, x.shape)).astype(x.dtype)

    out = {"params": variables["params"]}
    if "batch_stats" in variables:
        out["batch_stats"] = jax.tree_util.tree_map_with_path(stats, variables["batch_stats"])
    return out


def onnx_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_embed(session, images: np.ndarray, batch: int) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].astype(np.float32) / 127.5 - 1.0
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        out.append(session.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: x})[0])
    return np.concatenate(out)


def prepare(name: str):
    """(config, variables) of a model, the same in every process: seeded."""
    path, arg = MODELS[name]
    config = load_config(path, arg)
    config.model.dtype = "float32"  # the exported graph's precision (r50 trains in bfloat16)
    return config, random_variables(config)


def bench_images(config, batch: int, batches: int) -> np.ndarray:
    size = config.model.image_size
    return np.random.default_rng(1).integers(0, 256, (batch * batches, size, size, 3), np.uint8)


def export_checked(name: str, config, variables, folder: str, batch: int, threads: int) -> dict:
    """Writes model.onnx into `folder` and checks it against JAX on one batch."""
    onnx_path = os.path.join(folder, "model.onnx")
    state = convert.jax_to_torch(config.model, variables)
    onnx_export.export_onnx(config.model, state, onnx_path)
    images = bench_images(config, batch, 1)
    ours = FaceEncoder(config, variables).embed(
        images, flip_test=False, normalize=False, batch_size=batch
    )
    theirs = ort_embed(onnx_session(onnx_path, threads), images, batch)
    worst = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
    if worst > 1e-3:
        raise AssertionError(f"{name}: model.onnx differs from JAX by {worst:.2e} (relative)")
    return {"onnx_path": onnx_path, "max_relative_difference": worst}


def runner(kind: str, config, variables, onnx_path: str, batch: int, threads: int):
    """A function embedding a set of images with runtime `kind`."""
    if kind == "ours":
        encoder = FaceEncoder(config, variables)
        return lambda x: encoder.embed(x, flip_test=False, normalize=False, batch_size=batch)
    session = onnx_session(onnx_path, threads)
    return lambda x: ort_embed(session, x, batch)


def timed(run, images: np.ndarray, batch: int, passes: int, min_seconds: float) -> float:
    """The median seconds of a pass over the images, after one warm-up batch: at least `passes`
    passes and `min_seconds` of them (a fast model makes many short passes)."""
    run(images[:batch])
    times = []
    while len(times) < passes or sum(times) < min_seconds:
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args) -> None:
    """One runtime, one round, in this process: prints its seconds as JSON."""
    config, variables = prepare(args.models)
    run = runner(args.worker, config, variables, args.onnx, args.batch, args.threads)
    images = bench_images(config, args.batch, args.batches)
    print(json.dumps({"seconds": timed(run, images, args.batch, 2, args.min_seconds)}))


def isolated_seconds(name: str, config, variables, onnx_path: str, args) -> dict:
    """{runtime: [seconds per round]}, each round one process per runtime, alternating (each
    worker rebuilds the seeded config and variables)."""
    del config, variables
    seconds = {kind: [] for kind in RUNTIMES}
    for _ in range(args.repeats):
        for kind in seconds:
            command = [sys.executable, "-m", "benchmarks.inference", "--worker", kind]
            command += ["--models", name, "--onnx", onnx_path, "--batch", str(args.batch)]
            command += ["--threads", str(args.threads), "--batches", str(args.batches)]
            command += ["--min-seconds", str(args.min_seconds)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-4000:])
                raise SystemExit(f"benchmark worker {kind} ({name}) failed: {done.returncode}")
            seconds[kind].append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
    return seconds


def in_process_seconds(name: str, config, variables, onnx_path: str, args) -> dict:
    """{runtime: [seconds per round]}, both runtimes in this process, alternating."""
    del name
    images = bench_images(config, args.batch, args.batches)
    runs = {
        kind: runner(kind, config, variables, onnx_path, args.batch, args.threads)
        for kind in RUNTIMES
    }
    seconds = {kind: [] for kind in runs}
    for _ in range(args.repeats):
        for kind, run in runs.items():
            seconds[kind].append(timed(run, images, args.batch, 1, args.min_seconds / 2))
    return seconds


def bench_model(name: str, args) -> dict:
    config, variables = prepare(name)
    with tempfile.TemporaryDirectory() as folder:
        checked = export_checked(name, config, variables, folder, args.batch, args.threads)
        measure = in_process_seconds if args.in_process else isolated_seconds
        seconds = measure(name, config, variables, checked["onnx_path"], args)
    count = args.batch * args.batches
    rates = {k: count / statistics.median(v) for k, v in seconds.items()}
    return {
        "image_size": int(config.model.image_size),
        "images_per_second": {k: round(v, 1) for k, v in rates.items()},
        "images_per_second_each_round": {
            k: [round(count / t, 1) for t in v] for k, v in seconds.items()
        },
        "ratio": round(rates["ours"] / rates["onnxruntime"], 3),
        "max_relative_difference": checked["max_relative_difference"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,r50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed run")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="of passes per round")
    parser.add_argument("--in-process", action="store_true", help="both in this process")
    parser.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not among {', '.join(MODELS)}")
    if args.worker:
        return worker(args)
    results = {}
    for name in args.models.split(","):
        r = bench_model(name, args)
        results[name] = r
        ips = r["images_per_second"]
        print(
            f"{name} ({r['image_size']} px), batch {args.batch}, {args.threads} threads: ours "
            f"{ips['ours']:.1f} images/s, onnxruntime {ips['onnxruntime']:.1f} images/s, "
            f"ratio {r['ratio']:.2f}",
            flush=True,
        )
    method = "in-process" if args.in_process else "isolated"
    print(
        json.dumps(
            {"batch": args.batch, "threads": args.threads, "method": method, "results": results}
        )
    )


if __name__ == "__main__":
    main()
