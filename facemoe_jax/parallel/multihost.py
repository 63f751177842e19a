"""Multi-host start-up: `jax.distributed` from the environment, per-host log prefixes.

Every host runs the same command (`launch/*.sh` do that); this module decides, from the
environment alone, how the processes find each other:

  * explicit (any cluster, and `launch/local_multiprocess.sh`): FACEMOE_COORDINATOR=host:port,
    FACEMOE_NUM_PROCESSES=N, FACEMOE_PROCESS_ID=i;
  * SLURM (`launch/slurm_gpu.sh`): SLURM_NTASKS > 1 inside an `srun` step; JAX reads the node
    list, task count and rank itself;
  * Cloud TPU pods (`launch/tpu_pod.sh`): more than one host in TPU_WORKER_HOSTNAMES (or
    TPU_WORKER_ID set by the TPU VM runtime); JAX asks the TPU metadata server;
  * otherwise a single process: nothing to initialise.

On CPU (tests, laptops) the cross-process collectives need gloo, which must be chosen before
the backend starts. After start-up every host sees all devices (`jax.devices()`) and its own
(`jax.local_devices()`); the input pipeline reads shard `jax.process_index()` of
`jax.process_count()`, and only process 0 writes summaries (train/writers.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import jax

ENV_COORDINATOR = "FACEMOE_COORDINATOR"
ENV_NUM_PROCESSES = "FACEMOE_NUM_PROCESSES"
ENV_PROCESS_ID = "FACEMOE_PROCESS_ID"


def cluster_kind(env: Mapping[str, str]) -> str:
    """ "explicit", "slurm", "tpu_pod" or "single" for this environment."""
    if env.get(ENV_COORDINATOR):
        return "explicit"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "tpu_pod"
    return "single"


def explicit_arguments(env: Mapping[str, str]) -> dict:
    """coordinator_address, num_processes and process_id from FACEMOE_*; errors name the variable."""
    try:
        num_processes = int(env[ENV_NUM_PROCESSES])
        process_id = int(env[ENV_PROCESS_ID])
    except KeyError as e:
        raise ValueError(
            f"{ENV_COORDINATOR} is set, so {e.args[0]} must be set too "
            f"({ENV_NUM_PROCESSES}=N and {ENV_PROCESS_ID}=0..N-1)"
        ) from None
    except ValueError:
        raise ValueError(
            f"{ENV_NUM_PROCESSES}={env.get(ENV_NUM_PROCESSES)!r} and "
            f"{ENV_PROCESS_ID}={env.get(ENV_PROCESS_ID)!r} must be integers"
        ) from None
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"{ENV_PROCESS_ID}={process_id} must be in 0..{ENV_NUM_PROCESSES}-1 "
            f"(= {num_processes - 1})"
        )
    address = env[ENV_COORDINATOR]
    if ":" not in address:
        raise ValueError(f"{ENV_COORDINATOR}={address!r} must be host:port")
    return dict(coordinator_address=address, num_processes=num_processes, process_id=process_id)


def initialize_from_environment(env: Mapping[str, str] | None = None) -> str:
    """Starts jax.distributed as the environment says (before any JAX computation).

    Returns the cluster kind; for more than one process, stdout and stderr lines get a
    "[host i/n] " prefix so that interleaved logs of all hosts stay readable.
    """
    env = os.environ if env is None else env
    kind = cluster_kind(env)
    if kind == "single":
        return kind
    if "cpu" in env.get("JAX_PLATFORMS", "").split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kind == "explicit":
        jax.distributed.initialize(**explicit_arguments(env))
    else:
        jax.distributed.initialize()  # SLURM and TPU pods are detected by JAX itself
    if jax.process_count() > 1:
        prefix = f"[host {jax.process_index()}/{jax.process_count()}] "
        sys.stdout = PrefixedStream(sys.stdout, prefix)
        sys.stderr = PrefixedStream(sys.stderr, prefix)
    return kind


class PrefixedStream:
    """A text stream that starts every line with a prefix and hands whole lines to the stream.

    The processes of one run share a pipe; `print` writes the text and its newline separately,
    so passing pieces through would let another host's line land in between. Text is held until
    its line ends (or until `flush`), then the complete lines go out in one write and are
    flushed: one `write(2)` per group of lines, which a pipe keeps whole up to PIPE_BUF bytes.
    """

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix = stream, prefix
        self._at_line_start, self._pending = True, ""

    def _emit(self, text: str) -> None:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self._prefix)
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._stream.write("".join(out))
        self._stream.flush()

    def write(self, text: str) -> int:
        lines, newline, rest = (self._pending + text).rpartition("\n")
        if newline:
            self._emit(lines + newline)
        self._pending = rest
        return len(text)

    def flush(self):
        if self._pending:  # a line without its end yet (a progress bar): shown as it is
            self._emit(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def preflight(expected_devices: int | None = None) -> dict:
    """Checks that every host sees the same devices and that a psum over all of them works.

    Each device contributes 1 to a global array; the jitted sum must equal the global device
    count on every host. Returns the figures; raises RuntimeError naming the mismatch.
    """
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.devices()
    if expected_devices is not None and len(devices) != expected_devices:
        raise RuntimeError(
            f"host {jax.process_index()} sees {len(devices)} devices, expected {expected_devices}"
        )
    mesh = Mesh(np.asarray(devices), ("all",))
    local = np.ones((jax.local_device_count(),), np.float32)
    ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")), local)
    total = float(jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(ones))
    if total != len(devices):
        raise RuntimeError(
            f"host {jax.process_index()}: psum over {len(devices)} devices returned {total}"
        )
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": len(devices),
        "local_devices": jax.local_device_count(),
        "psum": total,
    }


if __name__ == "__main__":
    # python -m facemoe_jax.parallel.multihost [expected device count]: the launchers' preflight.
    initialize_from_environment()
    report = preflight(int(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"preflight ok: {report}", flush=True)
