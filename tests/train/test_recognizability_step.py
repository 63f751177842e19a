"""The train step with the recognizability index: the loss parts add up, c_UI moves as the
documented EMA of the batch's degraded copies, and a resumed run continues bitwise."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from facemoe_jax import recipes
from facemoe_jax.data.pipeline import normalize_images
from facemoe_jax.losses import recognizability
from facemoe_jax.train.checkpoint import config_changes
from tests.train.test_step import fixed_batch, setup, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_step_adds_the_ri_losses_and_moves_the_centre():
    config = tiny_config()
    recipes.recognizability(config)
    config.recognizability.ui_images = 8
    model, state, step = setup(config)
    assert state.ri_centre.shape == (32,) and not np.any(np.asarray(state.ri_centre))
    batch = fixed_batch()
    # c starts at 0, so after one step it is the direction of the degraded copies' embeddings.
    expected = jax.jit(lambda s, b: recognizability.next_centre(
        model, config, s, normalize_images(b["image"])))(state, batch)  # fmt: skip
    new_state, metrics = step(state, batch)
    np.testing.assert_allclose(np.asarray(new_state.ri_centre), np.asarray(expected), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new_state.ri_centre)), 1.0, rtol=1e-6)
    parts = (metrics["train/margin_ce"] + metrics["ri/diversion_loss"]
             + metrics["ri/quality_loss"])  # weights 1 and 1; router losses off (recipe)
    np.testing.assert_allclose(metrics["train/loss"], parts, rtol=1e-6)
    assert 0.0 <= float(metrics["ri/mean"]) <= 1.0


def test_turning_ri_on_over_a_checkpoint_without_it_is_refused():
    saved = {"model": {"name": "vit_moe"}, "recognizability": {"enabled": False}}
    old = {"model": {"name": "vit_moe"}}  # written before the switches existed
    for before in (saved, old):
        fixed, _ = config_changes(before, {"model": {"name": "vit_moe", "quality_head": True},
                                           "recognizability": {"enabled": True}})  # fmt: skip
        assert fixed == ["model.quality_head (checkpoint False, now True)",
                         "recognizability.enabled (checkpoint False, now True)"]  # fmt: skip
    assert config_changes(old, {"model": {"name": "vit_moe", "quality_head": False}}) == ([], [])


def _run(workdir, steps):
    args = [
        sys.executable, "-m", "facemoe_jax.main", "--config", "configs/recognizability.py",
        "--workdir", str(workdir), f"--config.train.num_steps={steps}",
        "--config.train.batch_size=16", "--config.train.log_every_steps=1",
        "--config.checkpoint.every_steps=2", "--config.checkpoint.max_to_keep=3",
        "--config.data.num_classes=16", "--config.data.synthetic_images_per_identity=4",
        "--config.loss.class_rows_multiple=8", "--config.model.image_size=32",
        "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.model.embed_dim=32", "--config.optimizer.warmup_steps=1",
        "--config.recognizability.ui_images=8", "--config.eval.synthetic_pairs=0",
        "--config.eval.low_resolutions=", "--config.eval.routing_map_faces=0",
        "--config.eval.synthetic_tinyface_identities=0",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return done.stdout, {r["step"]: (r["train/loss"], r["ri/cos_to_ui_centre"]) for r in rows}


@pytest.mark.slow
def test_resume_continues_bitwise_with_the_saved_centre(tmp_path):
    _, reference = _run(tmp_path / "a", 4)
    resumed_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "2", resumed_dir / "checkpoints" / "2")
    stdout, resumed = _run(resumed_dir, 4)
    assert "resumed from checkpoint at step 2" in stdout
    assert sorted(resumed) == [3, 4]
    assert resumed == {s: reference[s] for s in (3, 4)}  # loss and cos to c_UI, bitwise
