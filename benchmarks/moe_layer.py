r"""MoE feed-forward vs the dense MLP it replaces, measured side by side in one run.

  python -m benchmarks.moe_layer [--tokens 64] [--width 96] [--batch 128] [--experts 4] [--k 2]

Prints forward+backward milliseconds of: the dense MLP, the MoE capacity path (factor 1.25) and
the dropless path, and their ratios to dense. The design goal is MoE <= 1.3x dense at equal
width (each token runs K experts, so K x the expert FLOPs are unavoidable; the goal is about the
overhead of routing and data movement on top of K=1-equivalent work, see README).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from facemoe_jax.models.moe import MoEFeedForward
from facemoe_jax.models.vit import Mlp


def time_fwd_bwd(module, x, repeats):
    variables = module.init(jax.random.key(0), x)

    @jax.jit
    def fwd_bwd(params, x):
        def loss(p):
            out = module.apply({"params": p}, x)
            out = out[0] if isinstance(out, tuple) else out
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss)(params)

    jax.block_until_ready(fwd_bwd(variables["params"], x))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fwd_bwd(variables["params"], x)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--mlp-ratio", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    hidden = int(args.width * args.mlp_ratio)
    x = jax.random.normal(jax.random.key(1), (args.batch, args.tokens, args.width))
    dense_ms = time_fwd_bwd(Mlp(hidden), x, args.repeats)
    rows = [("dense MLP", dense_ms)]
    for name, factor in (("MoE capacity 1.25", 1.25), ("MoE dropless", None)):
        layer = MoEFeedForward(args.experts, args.k, hidden, capacity_factor=factor)
        rows.append((name, time_fwd_bwd(layer, x, args.repeats)))
    # The same expert work without routing: a dense MLP K times as wide.
    rows.append((f"dense MLP x{args.k} hidden", time_fwd_bwd(Mlp(hidden * args.k), x, args.repeats)))

    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); batch {args.batch} x "
          f"{args.tokens} tokens, width {args.width}, hidden {hidden}, E={args.experts}, K={args.k}")
    k_dense = rows[-1][1]
    for name, ms in rows:
        print(f"{name:>22}: {ms:8.2f} ms  {ms / dense_ms:5.2f}x dense  "
              f"{ms / k_dense:5.2f}x dense-x{args.k}")


if __name__ == "__main__":
    main()
