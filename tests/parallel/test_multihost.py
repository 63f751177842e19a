"""Multi-host start-up: environment parsing, and real multi-process runs on CPU devices.

The slow tests start `launch/local_multiprocess.sh` (2 processes x 4 fake CPU devices, gloo
collectives) and compare with one process of 8 devices and with one device.
"""

import io
import json
import os
import subprocess
import sys

import pytest

from facemoe_jax.parallel import multihost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")


@pytest.mark.parametrize(
    "env, kind",
    [
        ({}, "single"),
        (
            {"FACEMOE_COORDINATOR": "h:1", "FACEMOE_NUM_PROCESSES": "2", "FACEMOE_PROCESS_ID": "1"},
            "explicit",
        ),
        ({"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, "slurm"),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, "single"),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu_pod"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, "single"),
    ],
)
def test_cluster_kind_from_environment(env, kind):
    assert multihost.cluster_kind(env) == kind


def test_explicit_arguments_and_their_errors():
    env = {
        "FACEMOE_COORDINATOR": "10.1.2.3:1234",
        "FACEMOE_NUM_PROCESSES": "4",
        "FACEMOE_PROCESS_ID": "3",
    }
    assert multihost.explicit_arguments(env) == dict(
        coordinator_address="10.1.2.3:1234", num_processes=4, process_id=3
    )
    with pytest.raises(ValueError, match="FACEMOE_PROCESS_ID must be set too"):
        multihost.explicit_arguments({k: v for k, v in env.items() if k != "FACEMOE_PROCESS_ID"})
    with pytest.raises(ValueError, match="FACEMOE_PROCESS_ID=4 must be in 0..FACEMOE_NUM_PROC"):
        multihost.explicit_arguments({**env, "FACEMOE_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="must be integers"):
        multihost.explicit_arguments({**env, "FACEMOE_NUM_PROCESSES": "four"})
    with pytest.raises(ValueError, match="must be host:port"):
        multihost.explicit_arguments({**env, "FACEMOE_COORDINATOR": "10.1.2.3"})


def test_prefixed_stream_prefixes_every_line_once():
    sink = io.StringIO()
    stream = multihost.PrefixedStream(sink, "[host 1/2] ")
    stream.write("step 1")
    stream.write(" done\nstep 2\n")
    stream.write("")
    assert sink.getvalue() == "[host 1/2] step 1 done\n[host 1/2] step 2\n"


def test_prefixed_stream_hands_over_whole_lines_in_one_write():
    # Two hosts share one pipe: a line split over writes (print writes its text, then "\n")
    # must reach the pipe in one write, or another host's line can land inside it.
    writes = []

    class Sink:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    stream = multihost.PrefixedStream(Sink(), "[host 0/2] ")
    print("preflight ok: {'devices': 8}", file=stream, flush=True)
    assert writes == ["[host 0/2] preflight ok: {'devices': 8}\n"]
    stream.write("embed: 10/20 images")  # a progress line without its end yet
    assert len(writes) == 1
    stream.flush()
    stream.write(" done\n")
    assert writes[1:] == ["[host 0/2] embed: 10/20 images", " done\n"]


def _run(command, env_extra=None, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done.stdout


@pytest.mark.slow
def test_preflight_on_two_processes_sees_all_eight_devices():
    out = _run(
        [
            "bash",
            LAUNCH,
            "2",
            "4",
            "--",
            sys.executable,
            "-m",
            "facemoe_jax.parallel.multihost",
            "8",
        ]
    )
    lines = [line for line in out.splitlines() if "preflight ok" in line]
    assert len(lines) == 2
    assert {line.split("]")[0] for line in lines} == {"[host 0/2", "[host 1/2"}
    assert all("'psum': 8.0" in line and "'local_devices': 4" in line for line in lines)


TINY_RUN = [
    "--config",
    "configs/demo.py",
    "--config.mesh.expert=4",
    "--config.model.depth=2",
    "--config.model.image_size=32",
    "--config.train.num_steps=3",
    "--config.train.batch_size=16",
    "--config.train.log_every_steps=1",
    "--config.optimizer.warmup_steps=1",
    "--config.data.num_classes=32",
    "--config.data.synthetic_images_per_identity=2",
    "--config.eval.synthetic_pairs=0",
    "--config.eval.synthetic_tinyface_identities=0",
    "--config.eval.routing_map_faces=0",
    "--config.checkpoint.every_steps=100",
]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [row["train/loss"] for row in rows if "train/loss" in row]


@pytest.mark.slow
def test_demo_losses_match_across_one_device_eight_devices_and_two_hosts(tmp_path):
    main = [sys.executable, "-m", "facemoe_jax.main"]
    one = str(tmp_path / "one_device")
    _run(main + TINY_RUN + ["--workdir", one, "--config.mesh.expert=1"])
    eight = str(tmp_path / "eight_devices")
    out = _run(
        main + TINY_RUN + ["--workdir", eight],
        {
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
            + os.environ.get("XLA_FLAGS", "")
        },
    )
    assert "mesh {'data': 2, 'expert': 4}" in out
    hosts = str(tmp_path / "two_hosts")
    out = _run(["bash", LAUNCH, "2", "4", "--"] + main + TINY_RUN + ["--workdir", hosts])
    assert "[host 0/2] model:" in out and "[host 1/2] model:" in out
    reference = _losses(one)
    assert len(reference) == 3
    for workdir in (eight, hosts):
        losses = _losses(workdir)
        assert losses == pytest.approx(reference, rel=1e-5), workdir
