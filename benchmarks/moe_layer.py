r"""MoE feed-forward vs a dense FFN of equal *active* FLOPs, measured side by side in one run.

  python -m benchmarks.moe_layer [--tokens 1024,4096,16384,65536] [--width 128] [--hidden 256]
                                 [--experts 8] [--k 2] [--group 128]

Forward+backward milliseconds (median of --repeats) over the token counts of:
  * dense FFN with hidden K*H: the same FLOPs per token as an MoE token through its K experts;
  * MoE dropless (expert-sorted blocks, `grouped_matmul.block_expert_mlp`);
  * MoE capacity factor 1.25 (vmoe/Switch buffers; tokens over capacity dropped);
and the dropped share of the capacity path at factors 1.0 / 1.25 / 1.5 (routing per group of
--group tokens, router at initialisation). Ends with one JSON line; "ratio" = best MoE mode /
dense at 16k tokens (the design goal is <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.core import huge_pages
from facemoe_jax.models.moe import MoEFeedForward
from facemoe_jax.models.swin import exact_gelu


class DenseFFN(nn.Module):
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        h = exact_gelu(nn.Dense(self.hidden_dim, name="fc1")(x))
        return nn.Dense(x.shape[-1], name="fc2")(h), {}


def fwd_bwd(module, x):
    variables = module.init(jax.random.key(0), x[:1])

    @jax.jit
    def step(params, x):
        def loss(p, x):
            out, _ = module.apply({"params": p}, x)
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    jax.block_until_ready(step(variables["params"], x))
    return lambda: jax.block_until_ready(step(variables["params"], x)), variables


def dropped_share(layer, variables, x) -> float:
    _, metrics = layer.apply(variables, x)
    return float(metrics["dropped_fraction"])


def main():
    huge_pages.restart_with_huge_pages()  # as our entry points do (facemoe_jax/huge_pages.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1024,4096,16384,65536")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256, help="hidden width of one expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--group", type=int, default=128, help="tokens per routing group")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    modes = {
        f"dense FFN (hidden {args.k}x{args.hidden})": DenseFFN(args.k * args.hidden),
        "MoE dropless": MoEFeedForward(
            args.experts, args.k, args.hidden, activation=exact_gelu, capacity_factor=None
        ),
        "MoE capacity 1.25": MoEFeedForward(
            args.experts, args.k, args.hidden, activation=exact_gelu, capacity_factor=1.25
        ),
    }
    print(
        f"backend {jax.default_backend()}, width {args.width}, expert hidden {args.hidden}, "
        f"E={args.experts}, K={args.k}, groups of {args.group} tokens; fwd+bwd ms "
        f"(median of {args.repeats}), ratio to dense"
    )
    results = {}
    for tokens in [int(t) for t in args.tokens.split(",")]:
        x = jax.random.normal(jax.random.key(1), (tokens // args.group, args.group, args.width))
        runs = {name: fwd_bwd(module, x)[0] for name, module in modes.items()}
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved: shared-machine load hits all alike
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1e3)
        ms = {name: float(np.median(t)) for name, t in times.items()}
        dense = next(iter(ms.values()))
        drops = {}
        for factor in (1.0, 1.25, 1.5):
            layer = MoEFeedForward(
                args.experts, args.k, args.hidden, activation=exact_gelu, capacity_factor=factor
            )
            variables = layer.init(jax.random.key(0), x[:1])
            drops[factor] = dropped_share(layer, variables, x)
        best = min(v for k, v in ms.items() if k.startswith("MoE"))
        results[tokens] = {
            "ms": {k: round(v, 2) for k, v in ms.items()},
            "best_moe_over_dense": round(best / dense, 3),
            "dropped_share_capacity": {str(f): round(d, 4) for f, d in drops.items()},
        }
        line = "  ".join(f"{k} {v:8.1f} ms ({v / dense:4.2f}x)" for k, v in ms.items())
        print(f"{tokens:>6} tokens: {line}")
        print(
            f"{'':>14}capacity path drops "
            + ", ".join(f"{d * 100:.2f} % at factor {f}" for f, d in drops.items())
        )
    ref = 16384 if 16384 in results else max(results)
    out = {"tokens": results, "ratio_at": ref, "ratio": results[ref]["best_moe_over_dense"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
