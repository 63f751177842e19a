"""The command line: bad input ends in one clear line; a short run trains, resumes and evaluates."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, devices=1, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} {env.get('XLA_FLAGS', '')}"
    ).strip()
    return subprocess.run(
        [sys.executable, "-m", "facemoe_jax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_unknown_config_key(tmp_path):
    proc = run_main(
        "--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.model.num_expertz=4"
    )
    assert_one_line_error(proc, "num_expertz")


def test_impossible_top_k(tmp_path):
    proc = run_main(
        "--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.model.top_k=5"
    )
    assert_one_line_error(proc, "config.model.top_k=5", "num_experts=4")


def test_batch_size_the_devices_cannot_split(tmp_path):
    proc = run_main(
        "--config",
        "configs/demo.py",
        "--workdir",
        str(tmp_path),
        "--config.train.batch_size=12",
        devices=8,
    )
    assert_one_line_error(proc, "config.train.batch_size=12", "8 devices")


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_main("--config", "configs/demo.py", "--workdir", str(blocker / "run"))
    assert_one_line_error(proc, "--workdir=", "not writable")


def tiny_run_args(workdir, steps):
    # A relative --workdir, as users type it (Orbax itself only accepts absolute paths).
    return [
        "--config",
        "configs/demo.py",
        "--workdir",
        os.path.relpath(workdir, ROOT),
        f"--config.train.num_steps={steps}",
        "--config.train.batch_size=16",
        "--config.train.log_every_steps=2",
        "--config.checkpoint.every_steps=2",
        "--config.data.num_classes=20",
        "--config.data.worker_count=0",
        "--config.optimizer.warmup_steps=1",
        "--config.eval.synthetic_pairs=40",
        "--config.eval.low_resolutions=8",
        "--config.eval.batch_size=20",
        "--config.eval.synthetic_tinyface_identities=0",
    ]


@pytest.mark.slow
def test_train_resume_and_eval_end_to_end(tmp_path):
    first = run_main(*tiny_run_args(tmp_path, 4))
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [2, 4]
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert {"step", "synthetic", "synthetic@8px"} <= set(results)
    assert 0.0 <= results["synthetic"]["accuracy"] <= 1.0
    assert (tmp_path / "checkpoints" / "4").is_dir()

    # The same command with more steps continues from step 4.
    second = run_main(*tiny_run_args(tmp_path, 6))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint at step 4" in second.stdout
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]

    # Evaluation takes the model and data from the checkpoint: the training's flags
    # (num_classes=20, batch size ...) are not repeated, only the evaluation's.
    trained_results = (tmp_path / "eval" / "results.json").read_text()
    trained_metrics = (tmp_path / "metrics.jsonl").read_text()
    evaluated = run_main(
        "--config",
        "configs/demo.py",
        "--workdir",
        os.path.relpath(tmp_path, ROOT),
        *[a for a in tiny_run_args(tmp_path, 6) if a.startswith("--config.eval.")],
        "--mode=eval",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stderr == ""  # no Orbax/absl lines either
    assert "data.num_classes (checkpoint 20, now 0)" in evaluated.stdout
    again = json.load(open(tmp_path / "eval" / "step6_eval" / "results.json"))
    assert again["step"] == 6 and {"synthetic", "synthetic@8px"} <= set(again)
    assert again["synthetic"] == json.loads(trained_results)["synthetic"]  # the same weights
    # The training run's results and metrics are kept as training wrote them.
    assert (tmp_path / "eval" / "results.json").read_text() == trained_results
    assert (tmp_path / "metrics.jsonl").read_text() == trained_metrics
    assert (tmp_path / "eval" / "step6_eval" / "metrics.jsonl").is_file()


def test_config_file_with_a_syntax_error(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config(:\n")
    proc = run_main("--config", str(config), "--workdir", str(tmp_path / "w"))
    assert_one_line_error(proc, f"--config={config} line 1", "invalid syntax")
    assert not (tmp_path / "w").exists()


def test_config_whose_get_config_raises(tmp_path):
    config = tmp_path / "raises.py"
    config.write_text("def get_config(arg=None):\n    raise ValueError('no such recipe')\n")
    proc = run_main("--config", str(config), "--workdir", str(tmp_path / "w"))
    assert_one_line_error(proc, f"--config={config}", "ValueError: no such recipe")
    assert not (tmp_path / "w").exists()


def test_gs_workdir_without_network_names_the_bucket_and_creates_nothing_local(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "facemoe_jax.main",
            "--config",
            os.path.join(ROOT, "configs/demo.py"),
            "--workdir",
            "gs://facemoe-no-such-bucket-14/runs/x",
            "--config.train.num_steps=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_one_line_error(proc, "gs://facemoe-no-such-bucket-14")
    assert os.listdir(tmp_path) == []  # no local gs:/ folder


@pytest.mark.slow
def test_too_many_unreadable_images_end_in_one_line(tmp_path):
    import cv2
    import numpy as np

    faces = tmp_path / "faces"
    for identity in range(4):
        folder = faces / f"id{identity}"
        folder.mkdir(parents=True)
        for i in range(4):
            if i % 2:
                (folder / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
            else:
                cv2.imwrite(str(folder / f"{i}.jpg"), np.full((48, 48, 3), 40 * identity, np.uint8))
    workdir = tmp_path / "w"
    proc = run_main(
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        f"--config.data.train=folder:{faces}",
        "--config.data.num_classes=4",
        "--config.train.batch_size=8",
        "--config.train.num_steps=4",
        "--config.data.max_bad_share=0.01",
        "--config.eval.synthetic_pairs=0",
        "--config.eval.low_resolutions=",
        "--config.eval.routing_map_faces=0",
        "--config.eval.synthetic_tinyface_identities=0",
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "config.data.max_bad_share=0.01" in last, proc.stderr
    assert not (workdir / "checkpoints" / "4").exists()


def test_missing_data_path_creates_no_workdir(tmp_path):
    workdir = tmp_path / "w"
    proc = run_main(
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        "--config.data.train=folder:/nonexistent/faces",
    )
    assert_one_line_error(proc, "/nonexistent/faces")
    assert not workdir.exists()


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--config.train.trainable=lroa", "['lroa'] match no parameter"),
        (
            "--config.init_from=/nonexistent/run",
            "config.init_from='/nonexistent/run' does not exist",
        ),
    ],
)
def test_what_trains_and_where_it_starts_fail_before_the_workdir(tmp_path, override, fragment):
    workdir = tmp_path / "w"
    proc = run_main("--config", "configs/demo.py", "--workdir", str(workdir), override)
    assert_one_line_error(proc, fragment)
    assert not workdir.exists()


@pytest.mark.slow  # one run of the demo model in a subprocess (its compile): ~30-70 s on 2 cores
def test_a_folder_run_takes_the_class_count_from_the_data(tmp_path):
    import cv2
    import numpy as np

    from facemoe_jax.train import checkpoint as checkpoint_lib

    faces = tmp_path / "faces"
    for identity in range(3):
        (faces / f"id{identity}").mkdir(parents=True)
        for i in range(4):
            image = np.full((48, 48, 3), 60 * identity + 10 * i, np.uint8)
            cv2.imwrite(str(faces / f"id{identity}" / f"{i}.png"), image)
    workdir = tmp_path / "w"
    # The demo's command line with a folder and no class count (12 images: a batch of 8).
    dropped = ("--config.data.num_classes", "--config.train.batch_size", "--config.eval.")
    fast = [a for a in tiny_run_args(workdir, 2) if not a.startswith(dropped)]
    proc = run_main(
        *fast,
        f"--config.data.train=folder:{faces}",
        "--config.train.batch_size=8",
        "--config.eval.synthetic_pairs=0",
        "--config.eval.low_resolutions=",
        "--config.eval.routing_map_faces=0",
        "--config.eval.synthetic_tinyface_identities=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = checkpoint_lib.Checkpointer(str(workdir), 2, 1, create=False).saved_config(2)
    assert saved["data"]["num_classes"] == 3
