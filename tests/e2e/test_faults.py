"""Runs that survive faults (issue 14), as real subprocesses on CPU with a tiny model.

Run A trains 8 steps uninterrupted (checkpoints every 2 steps, a loss logged every step). Runs
killed with SIGKILL or stopped with SIGTERM after their step-4 checkpoint, then restarted with
the same command, must log bitwise the same losses for the steps after the restore and end with
bitwise the same parameters. A truncated checkpoint and one without _METADATA are skipped with
one warning each and the step before them restored; a NaN batch is skipped and counted; a
checkpoint of 8 fake devices on mesh (2,4) resumes on 1 device and on mesh (4,2).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from tests.e2e.tiny_run import tiny_run_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The command line with faults injected from outside the production code (a hook, an objective).
FAULT_INJECTION = os.path.join(ROOT, "tests", "e2e", "fault_injection.py")
STEPS, EVERY, N = 8, 2, 4  # checkpoints every 2 steps (the last 3 kept); signals after step N
# One persistent compilation cache for the runs of this module: the same program is compiled
# once (about 15 s on 2 cores), later runs load it (the same executable, so bitwise the same).
CACHE = tempfile.mkdtemp(prefix="facemoe_test_jax_cache_")


def env_for(devices=1, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} {env.get('XLA_FLAGS', '')}"
    ).strip()
    env.update(
        JAX_COMPILATION_CACHE_DIR=CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def args_for(workdir, steps=STEPS, *more):
    return [
        sys.executable,
        FAULT_INJECTION,
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        *tiny_run_flags(steps, EVERY),
        *more,
    ]


def run(workdir, steps=STEPS, *more, devices=1, **env):
    return subprocess.run(
        args_for(workdir, steps, *more),
        cwd=ROOT,
        env=env_for(devices, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def start(workdir, steps=STEPS, *more, **env):
    return subprocess.Popen(
        args_for(workdir, steps, *more),
        cwd=ROOT,
        env=env_for(1, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def losses(workdir) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps: {steps}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def final_params(workdir):
    import jax

    from facemoe_jax.train.checkpoint import restore_params

    _, params, _, step = restore_params(str(workdir))
    return step, jax.tree.map(np.asarray, params)


def assert_trees_equal(a, b):
    import jax

    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.array_equal(x, y), f"{path} differs"


def stderr_lines(proc_stderr: str) -> list[str]:
    return [line for line in proc_stderr.splitlines() if line.strip()]


def our_messages(proc_stderr: str) -> list[str]:
    """The run's own warning/error lines. A failed TensorStore read may leave its worker threads
    printing asyncio tracebacks ("Event loop is closed") after Orbax gave up on the step; that
    noise is TensorStore's, comes or not with thread timing, and is not what these tests check.
    Its text can land right before one of our lines (not inside it: each is one write), so a
    message is taken from where it starts in the line."""
    found = (re.search(r"(?:warning|error): .*", line) for line in proc_stderr.splitlines())
    return [m.group(0) for m in found if m]


def committed(workdir, step) -> bool:
    """Orbax renames a step's temporary folder when the save is complete."""
    return (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists()


def wait_for_checkpoint(proc, workdir, step, timeout=300):
    deadline = time.monotonic() + timeout
    while not committed(workdir, step):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def _remove_cache():
    yield
    shutil.rmtree(CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Run A: STEPS steps uninterrupted."""
    workdir = tmp_path_factory.mktemp("run_a")
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stderr_lines(proc.stderr) == [], proc.stderr  # no TensorFlow/absl lines
    return workdir, losses(workdir), final_params(workdir)


@pytest.mark.slow
def test_sigkill_then_restart_is_bitwise_identical(reference, tmp_path):
    ref_dir, ref_losses, (ref_step, ref_params) = reference
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    workdir = tmp_path / "run_b"
    proc = start(workdir, TEST_FAULT_STEP_SECONDS=0.25)
    wait_for_checkpoint(proc, workdir, N)
    time.sleep(random.uniform(0.0, 0.8))  # a random moment after the step-4 checkpoint
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    again = run(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint at step" in again.stdout
    resumed = losses(workdir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == ref_losses  # bitwise: the same float64 values from float32 losses
    step, params = final_params(workdir)
    assert step == ref_step == STEPS
    assert_trees_equal(params, ref_params)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_was_at_and_resumes_bitwise(reference, tmp_path):
    _, ref_losses, (_, ref_params) = reference
    workdir = tmp_path / "run_c"
    proc = start(workdir, TEST_FAULT_STEP_SECONDS=0.4)
    wait_for_checkpoint(proc, workdir, N)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    lines = stderr_lines(err)
    assert len(lines) == 2, err  # the notice, then the one line saying where it stopped
    assert lines[0].startswith("SIGTERM: finishing this step")
    stopped = int(lines[1].split(" at step ")[1].split()[0])
    assert N < stopped < STEPS
    assert f"stopped by SIGTERM at step {stopped} of {STEPS}" in lines[1]
    assert committed(workdir, stopped)
    assert max(losses(workdir)) == stopped

    again = run(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from checkpoint at step {stopped}" in again.stdout
    assert losses(workdir) == ref_losses  # no step twice, the same losses
    _, params = final_params(workdir)
    assert_trees_equal(params, ref_params)


def _copy_until(ref_dir, tmp_path, name):
    workdir = tmp_path / name
    shutil.copytree(ref_dir, workdir)
    return workdir


@pytest.mark.slow
def test_corrupt_checkpoints_are_skipped(reference, tmp_path):
    ref_dir, ref_losses, (_, ref_params) = reference
    workdir = _copy_until(ref_dir, tmp_path, "damaged")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6", "8"]
    # The latest: a data file truncated (a kill mid-write on a filesystem without rename).
    latest = workdir / "checkpoints" / str(STEPS)
    data_files = [
        os.path.join(d, f)
        for d, _, files in os.walk(latest / "state")
        for f in files
        if os.sep + "d" + os.sep in os.path.join(d, f)
    ]
    biggest = max(data_files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    # The one before: its _METADATA missing.
    before = workdir / "checkpoints" / str(STEPS - EVERY)
    os.remove(before / "state" / "_METADATA")
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = our_messages(proc.stderr)
    assert len(warnings) == 2, proc.stderr
    assert warnings[0].startswith(f"warning: checkpoint {latest} is unreadable")
    assert warnings[1].startswith(f"warning: checkpoint {before} is unreadable")
    assert "resumed from checkpoint at step 4" in proc.stdout
    assert len(os.listdir(workdir / "checkpoints_corrupt")) == 2
    assert losses(workdir) == ref_losses
    _, params = final_params(workdir)
    assert_trees_equal(params, ref_params)


@pytest.mark.slow
def test_nan_batches_are_skipped_and_counted_then_too_many_stop_the_run(tmp_path):
    # NaN images at step 3 (skipped, counted), then at 5 and 6: config.train.max_bad_steps=2 in
    # a row stop the run with a clear error and a checkpoint of the last good state.
    workdir = tmp_path / "nan"
    proc = run(workdir, STEPS, "--config.train.max_bad_steps=2", TEST_FAULT_NAN_STEPS="3,5,6")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = stderr_lines(proc.stderr)
    assert lines[:3] == [
        "step 3: non-finite loss or gradient, update skipped (1 in a row)",
        "step 5: non-finite loss or gradient, update skipped (1 in a row)",
        "step 6: non-finite loss or gradient, update skipped (2 in a row)",
    ]
    assert len(lines) == 4 and lines[3].startswith("error: 2 steps in a row (up to step 6)")
    assert "config.train.max_bad_steps=2" in lines[3]
    assert str(workdir / "checkpoints" / "6") in lines[3]
    rows = {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl"))}
    assert [rows[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 2, 3]
    assert np.isnan(rows[3]["train/loss"]) and np.isfinite(rows[4]["train/loss"])
    assert committed(workdir, 6)
    from facemoe_jax.train.checkpoint import restore_params

    # Steps 5 and 6 changed nothing: the step-6 checkpoint holds the state after step 4.
    _, params_4, stats_4, _ = restore_params(str(workdir), 4)
    _, params_6, stats_6, step = restore_params(str(workdir), 6)
    assert step == 6
    assert_trees_equal(params_6, params_4)
    assert_trees_equal(stats_6, stats_4)


@pytest.mark.slow
def test_another_architecture_is_refused_and_knobs_may_change(reference, tmp_path):
    ref_dir, _, _ = reference
    workdir = _copy_until(ref_dir, tmp_path, "changed")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    proc = run(workdir, STEPS, "--config.model.width=48", "--config.data.num_classes=12")
    assert proc.returncode == 2
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "another model or data" in lines[0]
    assert "model.width (checkpoint 32, now 48)" in lines[0]
    assert "data.num_classes (checkpoint 16, now 12)" in lines[0]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before

    proc = run(workdir, STEPS + 1, "--config.optimizer.learning_rate=0.0005")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "config changes since the checkpoint at step 8: optimizer.learning_rate 0.002 -> "
        "0.0005; train.num_steps 8 -> 9" in proc.stdout
    )
    assert sorted(losses(workdir)) == list(range(1, STEPS + 2))


@pytest.mark.slow
def test_resume_on_other_meshes_matches_to_float32_tolerance(tmp_path):
    # Run M: 8 fake devices, mesh data=2 x expert=4, checkpoint at step 4, 8 steps.
    full = tmp_path / "mesh_2x4"
    mesh_args = ("--config.mesh.data=2", "--config.mesh.expert=4")
    proc = run(full, STEPS, *mesh_args, devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = losses(full)
    others = [
        ("one_device", 1, ("--config.mesh.data=1",)),
        ("mesh_4x2", 8, ("--config.mesh.data=4", "--config.mesh.expert=2")),
    ]
    for name, devices, more in others:
        workdir = tmp_path / name
        shutil.copytree(full, workdir)
        for step in (6, 8):  # resume from step 4
            shutil.rmtree(workdir / "checkpoints" / str(step))
        proc = run(workdir, STEPS, *more, devices=devices)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"resumed from checkpoint at step {N}" in proc.stdout
        got = losses(workdir)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in range(N + 1, STEPS + 1):
            np.testing.assert_allclose(got[step], ref[step], rtol=2e-5, err_msg=f"{name} {step}")


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tmp_path):
    workdir = tmp_path / "twice"
    proc = start(workdir, TEST_FAULT_STEP_SECONDS=1.0)
    wait_for_checkpoint(proc, workdir, EVERY)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the first is handled (between two bytecodes of the main thread)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err[-3000:]  # killed by the signal itself
    assert [line.split(":")[0] for line in stderr_lines(err)] == ["SIGTERM"]  # no "stopped by"


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_error_not_a_fresh_start(reference, tmp_path):
    ref_dir, _, _ = reference
    workdir = _copy_until(ref_dir, tmp_path, "all_damaged")
    for step in os.listdir(workdir / "checkpoints"):
        os.remove(workdir / "checkpoints" / step / "state" / "_METADATA")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    proc = run(workdir)
    assert proc.returncode == 2
    lines = our_messages(proc.stderr)
    assert [line.split(" ")[0] for line in lines] == ["warning:"] * 3 + ["error:"], proc.stderr
    assert "no checkpoint in" in lines[-1] and "is readable (steps [4, 6, 8])" in lines[-1]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before


@pytest.mark.slow
def test_sigterm_to_one_host_of_two_saves_the_same_step_on_both(tmp_path):
    # Two processes of 4 fake devices each (as launch/local_multiprocess.sh starts them). JAX's
    # preemption service owns SIGTERM there: the host that gets it tells the other, both reach
    # multihost_utils.reached_preemption_sync_point at the same step, save it and exit 75.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "two_hosts"
    procs = [
        subprocess.Popen(
            args_for(workdir, 16, "--config.checkpoint.every_steps=4"),
            cwd=ROOT,
            env=env_for(
                4,
                FACEMOE_COORDINATOR=f"127.0.0.1:{port}",
                FACEMOE_NUM_PROCESSES=2,
                FACEMOE_PROCESS_ID=i,
                TEST_FAULT_STEP_SECONDS=0.3,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        wait_for_checkpoint(procs[0], workdir, 4)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stopped = set()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 75, err[-3000:]
        line = next(x for x in err.splitlines() if "stopped by preemption notice at step" in x)
        stopped.add(int(line.split(" at step ")[1].split()[0]))
    assert len(stopped) == 1  # the same step on both hosts
    (step,) = stopped
    assert 4 < step < 16 and committed(workdir, step)
