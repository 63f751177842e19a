"""benchmarks/inference.py at a tiny size: both methods run, check the export, and report."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_benchmark(*extra):
    command = [sys.executable, "-m", "benchmarks.inference", "--models", "demo", "--batch", "4"]
    command += ["--batches", "2", "--repeats", "2", "--threads", "1", "--min-seconds", "0.2"]
    command += extra
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("extra, method", [((), "isolated"), (("--in-process",), "in-process")])
def test_the_benchmark_reports_both_runtimes_and_their_ratio(extra, method):
    done = run_benchmark(*extra)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["method"] == method and report["batch"] == 4 and report["threads"] == 1
    demo = report["results"]["demo"]
    rates = demo["images_per_second"]
    assert rates["ours"] > 0 and rates["onnxruntime"] > 0
    assert demo["ratio"] == pytest.approx(rates["ours"] / rates["onnxruntime"], rel=1e-2)
    assert all(len(v) == 2 for v in demo["images_per_second_each_round"].values())
    assert demo["max_relative_difference"] < 1e-3  # the exported graph equals JAX
    assert "ratio" in done.stdout.splitlines()[0]


def test_an_unknown_model_is_refused_by_name():
    command = [sys.executable, "-m", "benchmarks.inference", "--models", "demo,r51"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--models: r51 not among demo, r50" in done.stderr
