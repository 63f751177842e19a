r"""Whole train steps, measured side by side in one run: ours against a PyTorch twin, or the MoE
paths of one config against its dense twin.

  python -m benchmarks.train_step --vs-torch [--full] [--models swin,vit] [--batch 16]
  python -m benchmarks.train_step [--config configs/demo.py] [--batch 128] [--steps 10]

--vs-torch: a full train step (forward, backward, AdamW, CosFace m=0.4 s=64 over 1,000 classes,
the official router losses with lambda_aux = 10, gradient clipping at 5) of the Swin-MoE (small:
120 px, patch 6, width 96, depths 2/2/2, heads 3/6/12, window 5, E=3, k=2, raw-logit combine)
and of a ViT-MoE (small: 112 px, patch 9, width 192, depth 6, 4 heads, MoE every 2nd block, E=8,
k=2), ours (dropless, the official semantics, and capacity factor 1.5) against PyTorch models of
the same architecture that route as the official FaceMoE code does (top-k on the gate logits,
then a loop over the experts with boolean indexing; `interop/torch_models.py`, the twins our
exports load into) with torch's AdamW, the same batch, the same threads. Drop-path is 0 on both
sides (the PyTorch twins have none). Ours and PyTorch each run alone in a process of their own,
one after the other (`--repeats` times, alternating; ours measures the dropless path first, then
the capacity path from the same initial state), as each framework runs when used: ours with
our entry points' default of huge pages for XLA:CPU's buffers (`facemoe_jax/huge_pages.py`;
`FACEMOE_HUGE_PAGES=0` turns it off), PyTorch with the environment as given. The median step
time of each is reported. `--in-process` runs the three in this one process instead, their steps
interleaved in `--rounds` rounds (the earlier method: on the development host whichever runtime
follows PyTorch's steps runs 8-54 % slower, see benchmarks/RESULTS.md).
--full uses the full-size official Swin-MoE (width 384, depths 2/18/2) at batch 4.
--precision bf16: mixed precision on both sides, as the official configs train (`fp16=True`:
the backbone's forward under autocast, the classifier and loss in float32): ours with
`config.model.dtype="bfloat16"` (parameters, router and losses stay float32), PyTorch's forward
under `torch.autocast("cpu", torch.bfloat16)` (CUDA's fp16 has no CPU kernel; bf16 is what both
runtimes use on a CPU with AVX512-BF16 or AMX).

Prints images/s of each, the ratio ours / PyTorch and our compile seconds, then one JSON line
with every figure and "ratio" (the Swin-MoE, ours dropless / PyTorch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.core import huge_pages
from facemoe_jax.models import build_model
from facemoe_jax.models.vit import parse_moe_layers
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from facemoe_jax.train import step as step_lib

NUM_CLASSES = 1000
LAMBDA_AUX = 10.0


def load_config(path, arg=None):
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def small_config(model: str, full: bool, precision: str = "f32"):
    """Our config at the benchmark size, with the official losses and optimiser."""
    config = load_config("configs/swin_moe_120.py", "tinyface_full")
    if model == "swin":
        if not full:
            config.model.update(width=96)
            config.model.depths = (2, 2, 2)
            config.model.stage_heads = (3, 6, 12)
    else:
        config.model.update(
            name="vit_moe",
            image_size=112,
            patch_size=9,
            width=192 if not full else 512,
            depth=6 if not full else 24,
            num_heads=4 if not full else 8,
            mlp_ratio=4.0,
            moe_layers="every:2",
            num_experts=8,
            top_k=2,
            router_combine="raw_logits",
        )
    config.model.drop_path_rate = 0.0
    config.model.dtype = {"f32": "float32", "bf16": "bfloat16"}[precision]
    config.data.num_classes = NUM_CLASSES
    config.loss.update(sample_rate=1.0)
    config.optimizer.update(warmup_steps=0)
    config.train.num_steps = 1000
    return config


def make_ours(config, batch_size, state=None):
    """(step function on a fixed batch, compile seconds, GFLOP per step, a copy of the initial
    state). `state`: start from a copy of this one (the MoE paths share their parameters, and
    building the state compiles the initialiser: seconds of the script's 2-minute budget)."""
    model = build_model(config.model)
    tx, schedule = optimizer_lib.build_optimizer(config.optimizer, config.train.num_steps)
    if state is None:
        state = state_lib.create_train_state(model, tx, config)
    state, initial = jax.tree.map(jnp.copy, state), state
    size = config.model.image_size
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (batch_size, size, size, 3), np.uint8)),
        "label": jnp.asarray(rng.integers(0, config.data.num_classes, batch_size, np.int32)),
    }
    step = jax.jit(step_lib.make_train_step(model, config, tx, schedule), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["train/loss"])

    run()  # the first call allocates
    return run, compile_s, float(cost.get("flops", 0.0)) / 1e9, initial


def make_torch(config, batch_size, threads, device="cpu"):
    """The same architecture in PyTorch, routing as the official code, trained the same way, on
    `device` ("cpu" or "cuda")."""
    import torch
    from torch.nn import functional as F

    from facemoe_jax.interop import torch_models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = config.model
    if m.name == "swin_moe":
        model = torch_models.SwinMoETorch(
            image_size=m.image_size,
            patch_size=m.patch_size,
            width=m.width,
            depths=tuple(m.depths),
            num_heads=tuple(m.stage_heads),
            window_size=m.window_size,
            mlp_ratio=m.mlp_ratio,
            embed_dim=m.embed_dim,
            num_experts=m.num_experts,
            top_k=m.top_k,
            router_combine=m.router_combine,
            capacity_factor=None,
            head_dropout=m.head_dropout,
        )
    else:
        model = torch_models.ViTMoETorch(
            image_size=m.image_size,
            patch_size=m.patch_size,
            width=m.width,
            depth=m.depth,
            num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio,
            embed_dim=m.embed_dim,
            moe_layers=parse_moe_layers(m.moe_layers, m.depth),
            num_experts=m.num_experts,
            top_k=m.top_k,
            router_combine=m.router_combine,
            capacity_factor=None,
        )
    model.to(device).train()
    # The official router computes its losses from the gate logits: collect them with hooks.
    gate_logits = []
    for module in model.modules():
        if isinstance(module, torch_models.MoEMlp):
            module.router.gate.register_forward_hook(lambda mod, inp, out: gate_logits.append(out))
    centres = torch.nn.Parameter(torch.randn(NUM_CLASSES, m.embed_dim, device=device) * 0.01)
    opt = torch.optim.AdamW(
        list(model.parameters()) + [centres], lr=1e-4, weight_decay=0.1, eps=1e-8
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, m.image_size, m.image_size, generator=gen) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    images, labels = images.to(device), labels.to(device)
    k = m.top_k

    def aux_loss():
        total = 0.0
        for logits in gate_logits:
            logits = logits.reshape(-1, logits.shape[-1])
            t, e = logits.shape
            z = 1e-3 * torch.mean(logits**2)
            p = torch.softmax(logits, dim=1)
            mask = torch.zeros_like(logits).scatter_(1, torch.topk(logits, k, dim=1)[1], 1.0)
            total = total + z + 1e-2 * e * torch.sum(p.sum(0) * mask.sum(0)) / (t * t)
        return total

    autocast = torch.autocast(
        "cuda" if device == "cuda" else "cpu",
        torch.bfloat16,
        enabled=config.model.dtype == "bfloat16",
    )

    def run():
        gate_logits.clear()
        with autocast:
            emb = model(images)
        emb = emb.float()
        cos = F.normalize(emb) @ F.normalize(centres).t()
        cos = cos - 0.4 * F.one_hot(labels, NUM_CLASSES)
        loss = F.cross_entropy(64.0 * cos, labels) + LAMBDA_AUX * aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    return run


SETTLE_S = 0.3


def interleaved(runs: dict, rounds: int, steps: int) -> dict:
    """Median seconds per step of each runner, its steps interleaved round by round.

    Each runner's timed steps follow a pause: the runtime that ran before (PyTorch's OpenMP
    workers, XLA's thread pool) keeps its threads spinning for a while after its last step, and
    they would otherwise steal cycles from whichever runner comes next (measured: PyTorch then
    ours back to back cost ours 10-15 % at 2 threads).
    """
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            for _ in range(steps):
                run()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: float(np.median(t)) for name, t in times.items()}


RUNNERS = {"dropless": 0.0, "capacity_1.5": 1.5, "pytorch": None}  # name: capacity factor
WORKERS = {"ours": ("dropless", "capacity_1.5"), "pytorch": ("pytorch",)}


def _time_steps(run, steps: int) -> float:
    run()  # a second warm-up step (the first ran in make_*)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def our_paths(args, model_name: str):
    """Yields (name, step function, compile seconds, GFLOP) of our two MoE paths in turn, the
    second built from the first's initial state (building a state compiles the initialiser)."""
    state = None
    for name in WORKERS["ours"]:
        config = small_config(model_name, args.full, args.precision)
        config.model.capacity_factor = RUNNERS[name]
        run, compile_s, gflops, state = make_ours(config, args.batch, state)
        yield name, run, compile_s, gflops


def worker(args):
    """Runners alone in this process, one after the other (ours: dropless first, then the
    capacity path from the same initial state); prints one JSON line {runner: figures}."""
    out = {}
    if args.worker == "pytorch":
        config = small_config(args.models, args.full, args.precision)
        run = make_torch(config, args.batch, args.threads or os.cpu_count())
        out["pytorch"] = {"step_s": _time_steps(run, args.steps)}
    else:
        for name, run, compile_s, gflops in our_paths(args, args.models):
            out[name] = {
                "step_s": _time_steps(run, args.steps),
                "compile_s": compile_s,
                "gflop": gflops,
                "huge_pages": huge_pages.huge_pages_on(),
            }
            del run  # its buffers, before the next path compiles
    print(json.dumps(out))


def isolated(args, model_name: str):
    """{runner: (median step seconds, compile seconds, GFLOP, huge pages)}: ours and PyTorch each
    in a process of their own, one at a time, `args.repeats` rounds."""
    results = {name: [] for name in RUNNERS}
    for _ in range(args.repeats):
        for kind in WORKERS:
            command = (
                [
                    sys.executable,
                    "-m",
                    "benchmarks.train_step",
                    "--worker",
                    kind,
                    "--models",
                    model_name,
                    "--batch",
                    str(args.batch),
                    "--steps",
                    str(args.steps),
                    "--precision",
                    args.precision,
                ]
                + (["--full"] if args.full else [])
                + (["--threads", str(args.threads)] if args.threads else [])
            )
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-4000:])
                raise SystemExit(
                    f"benchmark worker {kind} ({model_name}) failed: {done.returncode}"
                )
            for name, figures in json.loads(done.stdout.strip().splitlines()[-1]).items():
                results[name].append(figures)
    return {
        name: (
            float(np.median([r["step_s"] for r in runs])),
            runs[0].get("compile_s"),
            runs[0].get("gflop"),
            runs[0].get("huge_pages"),
        )
        for name, runs in results.items()
    }


def in_process(args, model_name: str):
    runs, compile_s, gflops = {}, {}, {}
    for name, run, seconds, gflop in our_paths(args, model_name):
        runs[name], compile_s[name], gflops[name] = run, seconds, gflop
    runs["pytorch"] = make_torch(
        small_config(model_name, args.full, args.precision),
        args.batch,
        args.threads or os.cpu_count(),
    )
    step_s = interleaved(runs, args.rounds, args.steps)
    on = huge_pages.huge_pages_on()
    return {name: (s, compile_s.get(name), gflops.get(name), on) for name, s in step_s.items()}


def vs_torch(args):
    threads = args.threads or os.cpu_count()
    results = {
        "batch": args.batch,
        "threads": threads,
        "precision": args.precision,
        "backend": jax.default_backend(),
    }
    results["method"] = "in-process" if args.in_process else "isolated"
    for model_name in args.models.split(","):
        measured = (in_process if args.in_process else isolated)(args, model_name)
        step_s = {name: m[0] for name, m in measured.items()}
        entry = {f"{name}_img_s": round(args.batch / s, 2) for name, s in step_s.items()}
        for path in ("dropless", "capacity_1.5"):
            entry[f"ratio_{path}"] = round(step_s["pytorch"] / step_s[path], 3)
            entry[f"compile_s_{path}"] = round(measured[path][1], 1)
            entry[f"gflop_per_step_{path}"] = round(measured[path][2], 2)
        entry["huge_pages_ours"] = measured["dropless"][3]
        results[model_name] = entry
        how = (
            f"steps interleaved in one process, median of {args.rounds} rounds x {args.steps}"
            if args.in_process
            else f"each alone in its own process, median of {args.repeats} x {args.steps} steps"
        )
        print(
            f"{model_name}-MoE ({'full' if args.full else 'small'} size), batch {args.batch}, "
            f"{threads} threads, {args.precision}, {how}; ours with "
            f"{'huge' if entry['huge_pages_ours'] else '4 KiB'} pages:"
        )
        print(f"  {'PyTorch (official routing)':>28}: {entry['pytorch_img_s']:7.2f} img/s")
        for path in ("dropless", "capacity_1.5"):
            print(
                f"  {'ours, ' + path:>28}: {entry[f'{path}_img_s']:7.2f} img/s  "
                f"ratio {entry[f'ratio_{path}']:.2f}  compile {entry[f'compile_s_{path}']:.1f} s"
                f"  {entry[f'gflop_per_step_{path}']:.2f} GFLOP/step"
            )
    first = args.models.split(",")[0]
    results["ratio"] = results[first]["ratio_dropless"]
    print(json.dumps(results))


def measure(config, batch_size, steps):
    run, compile_s, gflops, _ = make_ours(config, batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return compile_s, gflops, (time.perf_counter() - start) / steps


def vs_dense(args):
    variants = {
        "dense": dict(moe_layers="none"),
        "MoE dropless": dict(capacity_factor=0.0),
        "MoE capacity 1.25": dict(capacity_factor=1.25),
    }
    print(f"{args.config}, batch {args.batch}, backend {jax.default_backend()}")
    dense_s, results = None, {}
    for name, overrides in variants.items():
        config = load_config(args.config)
        config.model.update(**overrides)
        compile_s, gflops, step_s = measure(config, args.batch, args.steps)
        dense_s = dense_s or step_s
        results[name] = {"img_s": args.batch / step_s, "ratio_to_dense": step_s / dense_s}
        print(
            f"{name:>18}: compile {compile_s:5.1f} s, {gflops:7.2f} GFLOP/step, "
            f"{step_s * 1e3:8.1f} ms/step, {args.batch / step_s:7.1f} img/s, "
            f"{step_s / dense_s:4.2f}x dense"
        )
    results["ratio"] = results["MoE dropless"]["ratio_to_dense"]
    print(json.dumps(results))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vs-torch", action="store_true")
    parser.add_argument("--full", action="store_true", help="full-size models (with --vs-torch)")
    parser.add_argument("--models", default="swin,vit")
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="with --in-process")
    parser.add_argument("--repeats", type=int, default=1, help="processes per runner")
    parser.add_argument("--in-process", action="store_true", help="the three in this process")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--precision", choices=("f32", "bf16"), default="f32")
    args = parser.parse_args()
    for flag in ("threads", "steps", "rounds", "repeats", "batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"--{flag} {value}: need a positive number", file=sys.stderr)
            sys.exit(2)
    if args.threads:
        # Our side's threads: the size of PjRt's CPU thread pool, read from NPROC when the
        # backend starts (first use, so setting it here still applies). XLA's own
        # --xla_cpu_multi_thread_eigen=false does not limit this jaxlib's dots (YNNPACK), which
        # is how an earlier "--threads 1" let our matmuls use every core (benchmarks/RESULTS.md).
        os.environ["NPROC"] = str(args.threads)
        if args.threads == 1:
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
            )
    if args.worker == "ours" or not (args.worker or args.vs_torch):
        # As our entry points do. Not in the --vs-torch parent: its PyTorch worker keeps the
        # environment as given.
        huge_pages.restart_with_huge_pages()
    if args.worker:
        worker(args)
    elif args.vs_torch:
        args.batch = args.batch or (4 if args.full else 16)
        default_steps = (1 if args.full else 2) if args.in_process else (3 if args.full else 8)
        args.steps = args.steps or default_steps
        vs_torch(args)
    else:
        args.batch = args.batch or 128
        args.steps = args.steps or 10
        vs_dense(args)


if __name__ == "__main__":
    main()
