"""Mesh shapes from the config and the errors for layouts that do not fit."""

import jax
import ml_collections
import pytest

from facemoe_jax.parallel import mesh as mesh_lib


def mesh_cfg(**axes):
    return ml_collections.ConfigDict(axes)


@pytest.mark.parametrize(
    "axes, devices, expected",
    [
        (dict(data=-1, expert=1), 8, (8, 1)),
        (dict(data=-1, expert=4), 8, (2, 4)),
        (dict(data=2, expert=-1), 8, (2, 4)),
        (dict(data=1, expert=1), 1, (1, 1)),
    ],
)
def test_mesh_shape(axes, devices, expected):
    assert mesh_lib.mesh_shape(mesh_cfg(**axes), devices) == expected


@pytest.mark.parametrize(
    "axes, devices, message",
    [
        (dict(data=-1, expert=3), 8, "does not fit 8 devices"),
        (dict(data=2, expert=2), 8, "needs 4 devices but 8 are available"),
        (dict(data=-1, expert=-1), 8, "more than one axis"),
        (dict(data=-1, model=2), 8, "unknown axes"),
    ],
)
def test_mesh_errors(axes, devices, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.mesh_shape(mesh_cfg(**axes), devices)


def test_batch_size_that_fits_is_accepted():
    # The error for a batch the devices cannot split is checked with 8 fake devices in
    # tests/test_main.py (a subprocess, so the device count does not leak into other tests).
    mesh = mesh_lib.make_mesh(mesh_cfg(data=-1, expert=1))
    mesh_lib.check_batch_size(4 * jax.device_count(), mesh)
    assert mesh.shape == {"data": jax.device_count(), "expert": 1}
