"""Launchers that report failure, one workdir probe per run, no side effects of a refusal.

Issue 14: `launch/local_multiprocess.sh 2 1 -- false` returned 0 (and printed "wait: no such
job"); two processes of one run raced on the same probe file in a fresh workdir; --mode=eval
created a missing workdir before refusing; export/model.safetensors was written 0600.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")


def launch(*command):
    return subprocess.run(
        [LAUNCH, "2", "1", "--", *command], capture_output=True, text=True, timeout=300
    )


def test_launcher_reports_a_failing_process():
    proc = launch("false")
    assert proc.returncode == 1
    assert "no such job" not in proc.stderr and "not a child" not in proc.stderr


def test_launcher_success_is_zero():
    proc = launch("true")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_launcher_stops_the_others_and_exits_with_the_failing_status(tmp_path):
    # Process 1 fails at once; process 0 would write a marker after a long sleep. The launcher
    # returns only after every process ended, so a missing marker shows process 0 was stopped.
    marker = tmp_path / "process0_finished"
    script = (
        'if [ "$FACEMOE_PROCESS_ID" = 1 ]; then exit 3; fi; '
        f'exec python3 -c "import time; time.sleep(120); open(\'{marker}\', \'w\').close()"'
    )
    proc = launch("bash", "-c", script)
    assert proc.returncode == 3
    assert "a process exited with status 3; stopping the others" in proc.stderr
    assert not marker.exists()


def test_only_process_zero_probes_the_workdir(tmp_path, monkeypatch):
    import jax

    from facemoe_jax.train import loop

    workdir = tmp_path / "run"
    probes = []
    real_open = open

    def spying_open(path, *args, **kwargs):
        if str(path).endswith(".write_test"):
            probes.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spying_open)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    # Another process of the run waits for process 0 (here a thread) to create the folder.
    creator = threading.Timer(0.2, lambda: os.makedirs(workdir))
    creator.start()
    loop.check_workdir(str(workdir))
    creator.join()
    assert probes == [] and os.listdir(workdir) == []
    with pytest.raises(ValueError, match=r"--workdir=.*missing did not appear .* process 1"):
        loop.check_workdir(str(tmp_path / "missing"), wait_s=0.0)
    assert not (tmp_path / "missing").exists()

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    loop.check_workdir(str(tmp_path / "zero"))
    assert len(probes) == 1 and os.listdir(tmp_path / "zero") == []


def run_main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", "facemoe_jax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("mode", ["eval", "export"])
def test_eval_and_export_refuse_a_missing_workdir_without_creating_it(tmp_path, mode):
    workdir = tmp_path / "never_trained"
    proc = run_main("--config", "configs/demo.py", "--workdir", str(workdir), f"--mode={mode}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # The one error line is the last line (TensorFlow's start-up notices, where the CPU prints
    # them, are silenced elsewhere: tests/test_main.py checks that stderr holds one line).
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert f"--workdir={workdir} does not exist" in errors[0] and f"--mode={mode}" in errors[0]
    assert not workdir.exists()


def test_safetensors_file_mode_matches_its_siblings(tmp_path):
    from facemoe_jax.interop import convert

    path = tmp_path / "model.safetensors"
    convert.save_safetensors({"w": np.zeros((2, 3), np.float32)}, str(path))
    sibling = tmp_path / "config.json"
    sibling.write_text("{}")
    assert oct(path.stat().st_mode & 0o777) == oct(sibling.stat().st_mode & 0o777)
