"""benchmarks/accelerator.sh, the first command on a GPU machine, run as it is on this CPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", "benchmarks/accelerator.sh", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_the_script_runs_every_part_on_cpu_and_ends_with_its_json():
    done = run_script("--steps", "1", "--demo-steps", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["backend"] == "cpu" and summary["size"] == "small"
    assert summary["failed"] == []
    assert summary["demo"]["steps"] == 2
    # The demo's own evaluation ran: verification accuracies are fractions, above chance or not.
    assert summary["demo"]["results"], summary["demo"]
    assert all(0.0 <= v <= 1.0 for v in summary["demo"]["results"].values())
    for model in ("vit", "swin"):
        ours, torch, embed = (summary[model][k] for k in ("ours", "pytorch", "embed"))
        assert ours["batch"] == torch["batch"] == 8
        assert ours["img_s"] > 0 and torch["img_s"] > 0 and embed["img_s"] > 0
        assert ours["img_s"] == pytest.approx(8 / (ours["step_ms"] / 1e3), rel=1e-2)
        assert 0.0 < ours["mfu"] < 1.5  # a measured peak under load can be beaten a little
        assert ours["tflop_per_step"] > 0
        expected = round(ours["img_s"] / torch["img_s"], 3)
        assert summary[model]["ratio_ours_to_pytorch"] == pytest.approx(expected, abs=2e-3)


def test_bad_flags_are_refused_with_their_value():
    def refused(*flags):
        command = [sys.executable, "-m", "benchmarks.accelerator", *flags]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)

    done = refused("--skip", "demo,warp")
    assert done.returncode == 2 and "warp" in done.stderr
    done = refused("--steps", "0")
    assert done.returncode == 2 and "--steps 0" in done.stderr


def test_a_failing_part_is_reported_in_the_json_not_raised(monkeypatch):
    from benchmarks import accelerator

    class Done:
        returncode, stdout, stderr = 1, "", "Traceback\nRuntimeError: out of memory\n"

    monkeypatch.setattr(accelerator.subprocess, "run", lambda *a, **k: Done())
    out = accelerator.run_part("ours", "vit", "small", 1)
    assert out == {"error": "exit 1: Traceback | RuntimeError: out of memory"}
