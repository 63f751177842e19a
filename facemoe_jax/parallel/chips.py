"""Accelerator data sheets: what a chip can compute, hold and move, per chip.

The figures are the vendors' published ones (dense bf16 matrix peak, without sparsity; HBM
capacity and bandwidth), each with where it comes from. A JAX device is a chip, except on TPU v4
when the two TensorCores of a chip are separate devices (`core_on_chip` 0 and 1: a topology
without megacore); `devices_per_chip` says which, so per-device figures are the chip's shared out.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # per chip, dense
    hbm_bytes: float  # per chip
    hbm_bytes_per_second: float  # per chip
    source: str


# device_kind as JAX reports it -> data sheet. Exact names: "TPU v5" is v5p, "TPU v5 lite" v5e.
CHIPS = {
    "TPU v4": Chip("TPU v4", 275e12, 32 * GiB, 1200e9, "cloud.google.com/tpu/docs/v4 (per chip)"),
    "TPU v5 lite": Chip(
        "TPU v5e", 197e12, 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e (per chip)"
    ),
    "TPU v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e (per chip)"),
    "TPU v5": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, "cloud.google.com/tpu/docs/v5p (per chip)"),
    "TPU v5p": Chip(
        "TPU v5p", 459e12, 95 * GiB, 2765e9, "cloud.google.com/tpu/docs/v5p (per chip)"
    ),
    "TPU v6 lite": Chip(
        "TPU v6e", 918e12, 32 * GiB, 1640e9, "cloud.google.com/tpu/docs/v6e (per chip)"
    ),
    "TPU v6e": Chip(
        "TPU v6e", 918e12, 32 * GiB, 1640e9, "cloud.google.com/tpu/docs/v6e (per chip)"
    ),
    "TPU v3": Chip("TPU v3", 123e12, 32 * GiB, 900e9, "cloud.google.com/tpu/docs/v3 (per chip)"),
    "NVIDIA H200": Chip("NVIDIA H200", 989e12, 141e9, 4.8e12, "NVIDIA H200 data sheet (SXM)"),
    "NVIDIA H100": Chip(
        "NVIDIA H100", 989e12, 80e9, 3.35e12, "NVIDIA H100 data sheet (SXM; PCIe: 756 TFLOP/s)"
    ),
    "NVIDIA A100": Chip("NVIDIA A100", 312e12, 80e9, 2.039e12, "NVIDIA A100 data sheet (80GB SXM)"),
    "NVIDIA L4": Chip("NVIDIA L4", 121e12, 24e9, 300e9, "NVIDIA L4 data sheet"),
    "NVIDIA A10": Chip("NVIDIA A10", 125e12, 24e9, 600e9, "NVIDIA A10 data sheet"),
}


def chip_of(device_kind: str) -> Chip | None:
    """The data sheet of a device kind: its exact name, else the longest known prefix (GPU
    kinds carry suffixes such as "80GB HBM3"); None when unknown."""
    if device_kind in CHIPS:
        return CHIPS[device_kind]
    known = [k for k in CHIPS if k.startswith("NVIDIA") and device_kind.startswith(k)]
    return CHIPS[max(known, key=len)] if known else None


def devices_per_chip(devices) -> int:
    """JAX devices per physical chip: 2 where TensorCores are separate devices, else 1."""
    cores = {getattr(d, "core_on_chip", 0) for d in devices}
    return max(cores) + 1 if cores else 1
