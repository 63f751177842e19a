"""libtpu and the devices of a TPU topology, described on a machine that has no TPU."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile

from facemoe_jax.core import messages

LIBTPU_DIR_ENV = "FACEMOE_LIBTPU_DIR"
LIBTPU_VERSION = "0.0.42.1"  # the libtpu that jax[tpu]==0.10.2 pins


class AotError(ValueError):
    """A mistake the user can fix (no libtpu, an unknown topology, a config that cannot compile)."""


def use_libtpu() -> None:
    """Makes libtpu importable: installed in this environment, or the pip --target directory
    named by $FACEMOE_LIBTPU_DIR (put first on sys.path for this process only)."""
    folder = os.environ.get(LIBTPU_DIR_ENV, "")
    if folder:
        if not os.path.isdir(os.path.join(folder, "libtpu")):
            raise AotError(f"{LIBTPU_DIR_ENV}={folder} holds no libtpu package")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    # libtpu's lockfile guards a host's real chips; compiling for a described topology touches
    # none, and the lock would only keep a second compile (or a test worker) from starting.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(
            'compiling for a TPU topology needs libtpu: pip install "facemoe_jax[tpu-aot]", or '
            f"pip install --target DIR libtpu=={LIBTPU_VERSION} and {LIBTPU_DIR_ENV}=DIR"
        )


@contextlib.contextmanager
def _stderr_captured():
    """Holds what the process writes to file descriptor 2 (libtpu's C++ start-up lines) in a
    file; yields a function that returns it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield lambda: (held.seek(0), held.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as "v5p:2x2x1" or "v5e:4x4", with libtpu's start-up
    lines kept off stderr."""
    from jax.experimental import topologies

    use_libtpu()
    with _stderr_captured() as held:
        try:
            return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
        except Exception as e:  # libtpu's own errors; its lines say why
            lines = [line for line in held().splitlines() if line.strip()][-3:]
            raise AotError(
                f"--topology={name}: {messages.one_line(e)}"
                + (f" (libtpu: {' | '.join(lines)})" if lines else "")
            ) from None
