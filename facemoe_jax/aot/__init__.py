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

Modules, each importing only the ones above it:
  topology.py  libtpu (installed, or apart under $FACEMOE_LIBTPU_DIR) and a topology's devices;
  cost.py      pure arithmetic: the state's bytes by kind, the dropless experts' FLOPs, the
               roofline, the data x expert meshes to try, XLA's memory and cost figures;
  compile.py   the abstract sharded state and the compiled train and embedding steps;
  report.py    the report of a config on a topology, as a dict and as printed text;
  __main__.py  the command line.
This file re-exports nothing.
"""
