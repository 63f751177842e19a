"""The real-faces suite of the study (`--suite lfw`), on a fake LFW folder and a tiny ONNX
recognizer: row configs, path errors, and a whole study checked against onnxruntime."""

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper  # noqa: E402

from facemoe_jax import study, study_lfw  # noqa: E402
from facemoe_jax.evaluate import lfw  # noqa: E402
from tests.evaluate.test_lfw import make_fake_lfw, random_sets, write_pairs_file  # noqa: E402
from tests.models.test_onnx_graph import _weight, write_graph  # noqa: E402

TRAIN_PEOPLE, TEST_PEOPLE = 6, 5


def write_people(path, names, images=4):
    path.write_text("\n".join([str(len(names))] + [f"{n}\t{images}" for n in names]) + "\n")


@pytest.fixture
def fake_suite(tmp_path):
    """An LFW folder with View 1's files (disjoint train/test people) and View 2's, and a
    112 px -> 512-d ONNX model (a strided conv, PRelu, pooling and a linear head)."""
    root = tmp_path / "lfw"
    names = make_fake_lfw(root, people=TRAIN_PEOPLE + TEST_PEOPLE, images_per_person=3)
    train, test = names[:TRAIN_PEOPLE], names[TRAIN_PEOPLE:]
    write_people(root / "peopleDevTrain.txt", train, 3)
    write_people(root / "peopleDevTest.txt", test, 3)
    write_pairs_file(root / "pairsDevTrain.txt", random_sets(train, 1, 6, 3, seed=1), True)
    write_pairs_file(root / "pairsDevTest.txt", random_sets(test, 1, 6, 3, seed=2), True)
    write_pairs_file(root / "pairs.txt", random_sets(names, 3, 8, 3, seed=3))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[8, 8], kernel_shape=[8, 8]),
        helper.make_node("PRelu", ["c1", "slope"], ["p1"]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1),
    ]
    weights = [_weight("w1", 8, 3, 8, 8, scale=0.05), _weight("b1", 8), _weight("slope", 8, 1, 1)]
    weights += [_weight("w2", 8, 8, 1, 1), _weight("wg", 512, 8)]
    model = write_graph(tmp_path / "teacher.onnx", nodes, weights, size=112, out_dim=512)
    settings = study_lfw.LfwSettings(
        lfw_dir=str(root), teacher=model, steps=2, batch_size=4, warmup_steps=1
    )
    return settings


def test_row_configs(fake_suite):
    settings = fake_suite
    base = study_lfw.base_config(settings)
    configs = {
        name: study_lfw.adaptation_config(
            base, study_lfw.RECIPES[name], settings, 3, settings.teacher, {}
        )
        for name in ("teacher_lr_ft", "aird_instance", "aird")
    }
    for name, config in configs.items():
        assert config.seed == 3 and config.init_from == settings.teacher
        assert config.data.num_classes == TRAIN_PEOPLE  # every training person has 3 images
        assert config.data.people_file.endswith("peopleDevTrain.txt")
        assert config.data.acquisition_prob == settings.lr_prob, name
        assert (config.data.acquisition_min_pixels, config.data.acquisition_max_pixels) == (8, 32)
        assert config.train.num_steps == 2 and config.eval.flip_test is False
    assert configs["teacher_lr_ft"].distill.teacher == ""
    assert configs["aird_instance"].distill.teacher == os.path.abspath(settings.teacher)
    assert configs["aird_instance"].distill.relation_weight == 0.0
    assert configs["aird"].distill.relation_weight == settings.relation_weight > 0
    assert configs["aird"].distill.instance_weight == settings.instance_weight > 0


def test_missing_paths_are_named(fake_suite, tmp_path):
    settings = fake_suite
    study_lfw.check_paths(settings)
    with pytest.raises(ValueError, match="--teacher"):
        study_lfw.check_paths(study_lfw.LfwSettings(lfw_dir=settings.lfw_dir, teacher="no.onnx"))
    os.remove(os.path.join(settings.lfw_dir, "peopleDevTest.txt"))
    with pytest.raises(ValueError, match="peopleDevTest.txt is missing"):
        study_lfw.check_paths(settings)
    with pytest.raises(ValueError, match="aligned112"):
        study_lfw.check_paths(study_lfw.LfwSettings(lfw_dir=str(tmp_path)))
    code = study.main(["--suite", "lfw", "--out", str(tmp_path / "o"), "--lfw", str(tmp_path)])
    assert code == 2


def onnxruntime_embed(path):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def embed(images, flip_test):
        assert not flip_test
        x = ((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2)
        return session.run(None, {"x": x})[0]

    return embed


@pytest.mark.slow
def test_the_suite_against_onnxruntime(fake_suite, tmp_path, capsys):
    settings = fake_suite
    base = study_lfw.base_config(settings)
    out = str(tmp_path / "study")
    recipes = ["teacher", "aird", "adapters"]
    summary = study.run_study(base, out, recipes=recipes, settings=settings, suite=study.LFW)
    assert list(summary) == recipes
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    expected_keys = {f"{entry}/{metric}" for entry, metric, _ in study_lfw.COLUMNS}
    for row in rows:
        assert set(row["metrics"]) == expected_keys, row["recipe"]
    # The teacher row is the ONNX model as onnxruntime runs it, under the same protocol.
    embed = onnxruntime_embed(settings.teacher)
    teacher = rows[0]["metrics"]
    for pairs, mode in (("pairsDevTest.txt", "both"), ("pairsDevTest.txt", "probe")):
        reference = lfw.evaluate_lfw(embed, settings.lfw_dir, pairs, (112, 12), mode)["rows"]
        for name, metrics in reference.items():
            if name.endswith("probe112px"):  # the same pairs as both faces at 112: no column
                continue
            assert teacher[f"{name}/accuracy"] == pytest.approx(metrics["accuracy"]), name
    view2 = lfw.evaluate_lfw(embed, settings.lfw_dir, study_lfw.VIEW2_TEST_PEOPLE, (16,))
    assert teacher["lfw_view2_peopleDevTest@16px/accuracy"] == pytest.approx(
        view2["rows"]["lfw_view2_peopleDevTest@16px"]["accuracy"]
    )
    assert rows[1]["trainable_share"] == 1.0 and rows[1]["steps"] == 2
    assert 0 < rows[2]["trainable_share"] < 0.5  # adapters only: the teacher stays frozen
    table = open(os.path.join(out, "table.md")).read()
    assert "| aird | 100.0 % |" in table and "V1 both 12" in table and "V2 test people 8" in table
    assert os.path.getsize(os.path.join(out, "hr_vs_lr.png")) > 1000
    capsys.readouterr()
    again = study.run_study(base, out, recipes=recipes, settings=settings, suite=study.LFW)
    assert capsys.readouterr().out.count(" reused;") == 3 and again == summary


def test_the_teacher_row_is_evaluated_once_for_every_seed(fake_suite, tmp_path):
    settings = fake_suite
    base = study_lfw.base_config(settings)
    out = tmp_path / "study"
    summary = study.run_study(
        base, str(out), seeds=2, recipes=["teacher"], settings=settings, suite=study.LFW
    )
    rows = json.load(open(out / "results.json"))["rows"]
    assert [r["seed"] for r in rows] == [0, 1] and rows[0]["metrics"] == rows[1]["metrics"]
    assert not (out / "seed1").exists()
    assert summary["teacher"]["seeds"] == 2
    assert summary["teacher"]["lfw_view1@12px/accuracy"][1] == 0.0
