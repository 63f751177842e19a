"""The low-resolution adaptation study: deterministic rows, reuse, registration, errors."""

import json
import os
import subprocess
import sys

import pytest

from facemoe_jax.study import rows, runner, synthetic
from tests.train.test_step import tiny_config

SETTINGS = synthetic.StudySettings(
    steps=4,
    warmup_steps=1,
    lr_classes=12,
    lr_images_per_identity=3,
    verification_pairs=40,
    tinyface_identities=6,
    tinyface_distractors=10,
)
SUITE = synthetic.SYNTHETIC


def base_config():
    config = tiny_config(num_classes=16)
    config.model.capacity_factor = 2.0
    config.data.update(synthetic_images_per_identity=3, synthetic_cache=True)
    config.train.update(num_steps=6, batch_size=16, log_every_steps=3)
    config.eval.update(batch_size=32)
    config.checkpoint.update(every_steps=6)
    return config


def rows_of(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["rows"]


@pytest.mark.slow
def test_rows_are_deterministic_reused_and_tabled(tmp_path, capsys):
    recipes = ["pretrained", "facemoe"]  # facemoe starts from classifier_only: 3 rows
    first = runner.run_study(
        base_config(), str(tmp_path / "a"), recipes=recipes, settings=SETTINGS, suite=SUITE
    )
    assert list(first) == ["pretrained", "classifier_only", "facemoe"]
    runner.run_study(
        base_config(), str(tmp_path / "b"), recipes=recipes, settings=SETTINGS, suite=SUITE
    )
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    assert [r["metrics"] for r in a] == [r["metrics"] for r in b]  # bitwise the same numbers
    for row in a:
        assert set(row["metrics"]) == {f"{e}/{m}" for e, m, _ in synthetic.COLUMNS}, row["recipe"]
    assert a[1]["trainable_share"] == 0.0 and a[2]["trainable_share"] == 1.0
    # The classifier-only stage leaves the encoder's weights as they were.
    capsys.readouterr()
    again = runner.run_study(
        base_config(), str(tmp_path / "a"), recipes=recipes, settings=SETTINGS, suite=SUITE
    )
    out = capsys.readouterr().out
    assert out.count(" reused;") == 3 and "running" not in out
    assert again == first
    table = open(tmp_path / "a" / "table.md").read()
    assert "| facemoe | 100.0 % |" in table and "LR rank-1" in table
    assert os.path.getsize(tmp_path / "a" / "hr_vs_lr.png") > 1000


def test_a_registered_recipe_is_a_row_after_its_start():
    recipe = rows.Recipe("test_head", "test only", start="classifier_only")
    synthetic.register(recipe)
    try:
        names = [r.name for r in runner.order_rows(["test_head", "pretrained"], synthetic.RECIPES)]
        assert names == ["classifier_only", "test_head", "pretrained"]
        with pytest.raises(ValueError, match="already registered"):
            synthetic.register(recipe)
    finally:
        del synthetic.RECIPES["test_head"]
    with pytest.raises(ValueError, match="'nope' is not a registered recipe"):
        runner.order_rows(["nope"], synthetic.RECIPES)


def test_a_row_that_uses_another_runs_after_it_and_is_configured_with_its_run():
    names = [r.name for r in runner.order_rows(["petalface_ri", "pretrained"], synthetic.RECIPES)]
    assert names == ["ri", "petalface_ri", "pretrained"]
    recipe = synthetic.RECIPES["petalface_ri"]
    config = synthetic.adaptation_config(base_config(), recipe, SETTINGS, 0, "/x", {"ri": "/s/ri"})
    assert config.model.lora.quality == "recognizability:/s/ri"
    assert config.model.lora.quality_mix and config.train.trainable == "lora,^classifier/"
    with pytest.raises(ValueError, match="'petalface_ri' needs the runs of \\['ri'\\]"):
        synthetic.adaptation_config(base_config(), recipe, SETTINGS, 0, "/x")


def test_a_row_is_rerun_when_a_run_it_uses_changes(tmp_path, monkeypatch):
    seen = []

    def configure(config, workdirs):
        seen.append(workdirs)

    recipe = rows.Recipe(
        "test_user", "test only", uses=("full_ft",), configure=configure, train=False
    )
    monkeypatch.setattr(runner, "evaluate_start", lambda start, config, row_dir: {})
    out = str(tmp_path)
    used = tmp_path / "seed0" / "full_ft"
    used.mkdir(parents=True)
    (used / "row.json").write_text(json.dumps({"fingerprint": "first"}))
    starts = {rows.PRETRAINED: str(tmp_path / "pre")}
    first = runner.run_row(base_config(), recipe, SETTINGS, 0, out, starts, SUITE)
    assert seen[-1] == {"full_ft": str(used)} and not first["reused"]
    assert runner.run_row(base_config(), recipe, SETTINGS, 0, out, starts, SUITE)["reused"]
    (used / "row.json").write_text(json.dumps({"fingerprint": "second"}))
    again = runner.run_row(base_config(), recipe, SETTINGS, 0, out, starts, SUITE)
    assert not again["reused"] and again["fingerprint"] != first["fingerprint"]


def test_adaptation_config_is_the_lr_set_with_the_recipe_applied():
    config = synthetic.adaptation_config(
        base_config(), synthetic.RECIPES["classifier_only"], SETTINGS, seed=2, start_dir="/x"
    )
    assert config.data.train == "synthetic_lr" and config.data.num_classes == 12
    assert config.seed == 2 and config.init_from == "/x" and not config.init_classifier
    assert config.train.trainable == "^classifier/" and config.train.update_batch_stats
    assert config.eval.synthetic_tinyface_identities == 6
    facemoe = synthetic.adaptation_config(
        base_config(), synthetic.RECIPES["facemoe"], SETTINGS, 0, "/y"
    )
    assert facemoe.init_classifier and facemoe.loss.z_coef == pytest.approx(10 * 1e-3)
    # The RI rows train on lr_student's paired captures: the quality head's clean copies are
    # then the full-size renders, not the 8-16 px captures.
    for name in ("ri", "lr_student"):
        paired = synthetic.adaptation_config(
            base_config(), synthetic.RECIPES[name], SETTINGS, 0, "/y"
        )
        assert paired.data.train == "synthetic_lr_hr" and paired.data.acquisition_prob == 1.0


def test_command_line_errors_are_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "facemoe_jax.study",
            "--out",
            str(tmp_path / "s"),
            "--config",
            str(tmp_path / "missing.py"),
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --config=")
    assert "missing.py" in result.stderr


def test_an_interrupted_run_folder_is_kept_for_the_same_settings_only(tmp_path):
    folder = tmp_path / "row"
    runner.prepare_run_dir(str(folder), "key-a")
    (folder / "checkpoints").mkdir()
    runner.prepare_run_dir(str(folder), "key-a")  # the same settings: continue from checkpoints
    assert (folder / "checkpoints").is_dir()
    runner.prepare_run_dir(str(folder), "key-b")  # other settings: start again
    assert not (folder / "checkpoints").exists()
    assert json.load(open(folder / "pending.json")) == {"fingerprint": "key-b"}
