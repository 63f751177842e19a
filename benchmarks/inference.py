r"""CPU inference: `FaceEncoder.embed` against onnxruntime running our own exported model.onnx,
the same images, batch and threads, measured side by side in one run.

  python -m benchmarks.inference [--models demo,r50] [--batch 64] [--threads 2] [--repeats 5]

For each model (random weights with non-trivial BatchNorm statistics; speed does not depend on
their values): the JAX variables are exported with our exporter (`interop/onnx.py`, the
`--mode=export` path) to model.onnx, whose embeddings are checked against JAX's first. Then the
same 4 batches of uint8 RGB faces are embedded, alternately, `--repeats` times by
  * ours: `FaceEncoder.embed(images, flip_test=False, normalize=False, batch_size=B)`, the
    uint8 -> [-1, 1] conversion inside the compiled function;
  * onnxruntime: the same conversion and NHWC -> NCHW in numpy (as a deployment does), then
    `InferenceSession.run` with `intra_op_num_threads=T`, `inter_op_num_threads=1`.
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
import tempfile
import time

import jax
import numpy as np

from benchmarks.train_step import load_config
from facemoe_jax.encoder import FaceEncoder
from facemoe_jax.interop import convert
from facemoe_jax.interop import onnx as onnx_export
from facemoe_jax.models import build_model

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


def bench_model(name: str, batch: int, threads: int, repeats: int, batches: int) -> dict:
    path, arg = MODELS[name]
    config = load_config(path, arg)
    config.model.dtype = "float32"  # the exported graph's precision (r50 trains in bfloat16)
    variables = random_variables(config)
    encoder = FaceEncoder(config, variables)
    size = config.model.image_size
    images = np.random.default_rng(1).integers(0, 256, (batch * batches, size, size, 3), np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = os.path.join(folder, "model.onnx")
        state = convert.jax_to_torch(config.model, variables)
        onnx_export.export_onnx(config.model, state, onnx_path)
        session = onnx_session(onnx_path, threads)
        ours_emb = encoder.embed(images[:batch], flip_test=False, normalize=False, batch_size=batch)
        ort_emb = ort_embed(session, images[:batch], batch)  # also the first (warm-up) run
        worst = float(np.max(np.abs(ours_emb - ort_emb)) / np.max(np.abs(ort_emb)))
        if worst > 1e-3:
            raise AssertionError(f"{name}: model.onnx differs from JAX by {worst:.2e} (relative)")
        times = {"ours": [], "onnxruntime": []}
        for _ in range(repeats):
            start = time.perf_counter()
            encoder.embed(images, flip_test=False, normalize=False, batch_size=batch)
            times["ours"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ort_embed(session, images, batch)
            times["onnxruntime"].append(time.perf_counter() - start)
    rates = {k: len(images) / statistics.median(v) for k, v in times.items()}
    return {
        "image_size": size,
        "images_per_second": {k: round(v, 1) for k, v in rates.items()},
        "ratio": round(rates["ours"] / rates["onnxruntime"], 3),
        "max_relative_difference": worst,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,r50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed run")
    args = parser.parse_args()
    results = {}
    for name in args.models.split(","):
        r = bench_model(name, args.batch, args.threads, args.repeats, args.batches)
        results[name] = r
        ips = r["images_per_second"]
        print(
            f"{name} ({r['image_size']} px), batch {args.batch}, {args.threads} threads: ours "
            f"{ips['ours']:.1f} images/s, onnxruntime {ips['onnxruntime']:.1f} images/s, "
            f"ratio {r['ratio']:.2f}",
            flush=True,
        )
    print(json.dumps({"batch": args.batch, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
