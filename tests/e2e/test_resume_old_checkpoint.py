"""A checkpoint written before the training objectives were split out still resumes, and the
steps after it log what the old code logged (tests/e2e/data/checkpoint_before_objectives)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.e2e.tiny_run import tiny_run_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "e2e", "data", "checkpoint_before_objectives")
TINY = tiny_run_flags(steps=4, checkpoint_every=2)  # the flags the fixture was written with
EXTRA = {
    "demo": [],
    "recognizability": [
        "--config.recognizability.ui_images=8",
        "--config.recognizability.quality_images=12",
        "--config.eval.quality_identities=0",
        "--config.loss.margin=adaface",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXTRA))
def test_pre_objectives_checkpoint_resumes_with_the_same_losses(name, tmp_path):
    workdir = tmp_path / name
    shutil.copytree(os.path.join(FIXTURE, name), workdir)
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable,
        "-m",
        "facemoe_jax.main",
        "--config",
        f"configs/{name}.py",
        "--workdir",
        str(workdir),
        *TINY,
        *EXTRA[name],
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from checkpoint at step 2" in result.stdout
    logged = {}
    for line in open(workdir / "metrics.jsonl"):
        row = json.loads(line)
        logged[str(row["step"])] = row
    expected = json.load(open(os.path.join(FIXTURE, name, "expected_steps_3_4.json")))
    for step, values in expected.items():
        for key, value in values.items():
            # Bitwise on the machine that wrote them; other core counts change the last bits.
            np.testing.assert_allclose(
                logged[step][key], value, rtol=2e-5, atol=1e-6, err_msg=f"step {step} {key}"
            )
