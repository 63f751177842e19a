"""Model FLOPs utilisation: XLA's FLOPs per step and per device over step time and device peak.

`flops_per_device(compiled)` is XLA's cost analysis of the compiled (SPMD-partitioned) step, so
it counts the FLOPs *one device* runs per step (the same step compiles to 6.60 GFLOP on one
device and about an eighth of it per device on eight). XLA counts a loop body once whatever its
trip count, so the dropless MoE experts (`kernels/grouped_matmul.py`, loops over row blocks) are
mostly missing from it: for the dropless path the figure and the MFU are lower bounds.

Peaks are dense bf16 matrix FLOP/s per device from the vendors' data sheets
(`parallel/chips.py`; the usual MFU convention, whatever dtype the step uses); on CPU, where there is no data sheet for a share of a
shared host, the peak is measured once: the best float32 matmul rate XLA reaches on this host,
divided over the (fake) CPU devices.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from facemoe_jax.parallel import chips


def flops_per_device(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(size: int = 1024, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of XLA on this host, per CPU device."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / max(1, len(jax.devices("cpu")))


def peak_flops_per_device(device=None, devices=None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from); `devices`: the device's
    platform's devices (default: all of them), to tell whether chips are split into devices."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_peak(), "measured float32 matmul peak of this host, per CPU device"
    chip = chips.chip_of(device.device_kind)
    if chip is None:
        return 0.0, f"no peak known for {device.device_kind!r}"
    shared = chips.devices_per_chip(jax.devices(device.platform) if devices is None else devices)
    per = f", shared by {shared} devices per chip" if shared > 1 else ""
    return chip.peak_bf16_flops / shared, f"{chip.name} data-sheet bf16 peak{per}"


def mfu(flops_per_device_per_step: float | None, steps_per_sec: float, peak: float) -> float:
    if not flops_per_device_per_step or not peak:
        return 0.0
    return flops_per_device_per_step * steps_per_sec / peak
