"""The demo config trains from a RecordIO pack written by the pack command."""

import json
import os
import subprocess
import sys

import cv2
import pytest

from facemoe_jax.data import pack, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_demo_trains_from_a_packed_recordio_file(tmp_path):
    # 20 identities x 10 synthetic faces as JPEG files, one folder per identity.
    for identity in range(20):
        folder = tmp_path / "faces" / f"id{identity:03d}"
        folder.mkdir(parents=True)
        for k in range(10):
            image = synthetic.render_identity_image(identity, k, 48, seed=3)
            cv2.imwrite(str(folder / f"{k}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    pack.main(["--images", str(tmp_path / "faces"), "--out", str(tmp_path / "rec")])
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    args = [
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        f"--config.data.train=recordio:{tmp_path / 'rec'}",
        "--config.data.num_classes=20",
        "--config.data.num_images=200",
        "--config.data.low_res_prob=0.2",
        "--config.train.num_steps=4",
        "--config.train.batch_size=16",
        "--config.train.log_every_steps=2",
        "--config.checkpoint.every_steps=4",
        "--config.optimizer.warmup_steps=1",
        "--config.eval.synthetic_pairs=40",
        "--config.eval.low_resolutions=8",
        "--config.eval.batch_size=20",
        "--config.eval.synthetic_tinyface_identities=0",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "facemoe_jax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RecordIODataSource" in proc.stdout
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    logged = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(r["data/skipped_records"] == 0 for r in logged)

    # A data/config mismatch stops before training, naming both numbers.
    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "facemoe_jax.main",
            *args[:2],
            "--workdir",
            str(tmp_path / "w2"),
            args[4],
            "--config.data.num_classes=30",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode != 0 and "num_classes=30 but" in wrong.stderr
