"""The chip data sheets: JAX's device kinds map to the right chip, and per-device peaks share a
chip's peak when its TensorCores are separate devices."""

import types

from facemoe_jax.parallel import chips


def test_device_kinds_as_jax_reports_them():
    # TPU v5p reports "TPU v5" and v5e "TPU v5 lite" (jax.experimental.topologies, libtpu 0.0.42).
    assert chips.chip_of("TPU v5").name == "TPU v5p"
    assert chips.chip_of("TPU v5").peak_bf16_flops == 459e12
    assert chips.chip_of("TPU v5 lite").name == "TPU v5e"
    assert chips.chip_of("TPU v6 lite").hbm_bytes == 32 * 2**30
    assert chips.chip_of("TPU v4").hbm_bytes_per_second == 1200e9
    # GPU kinds carry suffixes; the longest known prefix wins (an A100 is not an A10).
    assert chips.chip_of("NVIDIA H100 80GB HBM3").name == "NVIDIA H100"
    assert chips.chip_of("NVIDIA A100-SXM4-80GB").name == "NVIDIA A100"
    assert chips.chip_of("NVIDIA A10G").name == "NVIDIA A10"
    assert chips.chip_of("TPU v7x") is None
    assert chips.chip_of("cpu") is None


def test_devices_per_chip_counts_tensorcores_that_are_separate_devices():
    def device(core):
        return types.SimpleNamespace(core_on_chip=core)

    assert chips.devices_per_chip([device(0), device(1), device(0), device(1)]) == 2
    assert chips.devices_per_chip([device(0)] * 4) == 1
    assert chips.devices_per_chip([object()]) == 1  # CPU and GPU devices have no such attribute
