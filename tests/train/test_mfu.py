"""Device peaks for MFU: the data sheet of the device's chip, shared among its devices."""

import types

import jax

from facemoe_jax.train import mfu


def tpu(kind, core=0):
    return types.SimpleNamespace(platform="tpu", device_kind=kind, core_on_chip=core)


def test_tpu_v5p_reports_as_tpu_v5_and_gets_its_peak():
    device = tpu("TPU v5")
    peak, source = mfu.peak_flops_per_device(device, [device] * 4)
    assert peak == 459e12 and "TPU v5p" in source


def test_a_chip_split_into_two_devices_shares_its_peak():
    devices = [tpu("TPU v4", core) for core in (0, 1, 0, 1)]
    peak, source = mfu.peak_flops_per_device(devices[0], devices)
    assert peak == 275e12 / 2 and "shared by 2 devices per chip" in source


def test_unknown_kinds_say_so_and_cpu_measures_its_own():
    peak, source = mfu.peak_flops_per_device(tpu("TPU v9"), [])
    assert peak == 0.0 and "'TPU v9'" in source
    peak, source = mfu.peak_flops_per_device(jax.devices("cpu")[0])
    assert peak > 0 and "measured" in source
    assert mfu.mfu(2e9, 10.0, 4e10) == 0.5 and mfu.mfu(None, 10.0, 4e10) == 0.0
