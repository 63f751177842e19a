"""The real-faces suite of the study (`--suite lfw`), on a fake LFW folder and a tiny ONNX
recognizer: row configs, path errors, and a whole study checked against onnxruntime."""

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper  # noqa: E402

from facemoe_jax.study import cli, runner  # noqa: E402
from facemoe_jax.study import lfw as study_lfw  # noqa: E402
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
    code = cli.main(["--suite", "lfw", "--out", str(tmp_path / "o"), "--lfw", str(tmp_path)])
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
    summary = runner.run_study(base, out, recipes=recipes, settings=settings, suite=study_lfw.LFW)
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
    again = runner.run_study(base, out, recipes=recipes, settings=settings, suite=study_lfw.LFW)
    assert capsys.readouterr().out.count(" reused;") == 3 and again == summary


def test_the_teacher_row_is_evaluated_once_for_every_seed(fake_suite, tmp_path):
    settings = fake_suite
    base = study_lfw.base_config(settings)
    out = tmp_path / "study"
    summary = runner.run_study(
        base, str(out), seeds=2, recipes=["teacher"], settings=settings, suite=study_lfw.LFW
    )
    rows = json.load(open(out / "results.json"))["rows"]
    assert [r["seed"] for r in rows] == [0, 1] and rows[0]["metrics"] == rows[1]["metrics"]
    assert not (out / "seed1").exists()
    assert summary["teacher"]["seeds"] == 2
    assert summary["teacher"]["lfw_view1@12px/accuracy"][1] == 0.0


def test_the_aird_adapt_bn_row_config(fake_suite):
    settings = fake_suite
    recipe = study_lfw.RECIPES["aird_adapt_bn"]
    assert recipe.start == "aird" and not recipe.train
    order = runner.order_rows(["aird_adapt_bn"], study_lfw.RECIPES)
    assert [r.name for r in order] == ["aird", "aird_adapt_bn"]  # its start runs first
    base = study_lfw.base_config(settings)
    config = study_lfw.adaptation_config(base, recipe, settings, 2, "/runs/aird", {})
    assert config.model.onnx_batchnorm == "every_conv" and config.eval.adapt_bn == "cumulative"
    assert config.model.onnx_batchnorm_images == 512 and config.seed == 2
    assert config.init_from == "/runs/aird"
    # Calibrated on the training people's images, evaluated on the others.
    assert config.data.people_file.endswith(study_lfw.TRAIN_PEOPLE)
    assert base.model.onnx_batchnorm == "off" and base.eval.adapt_bn == "off"


@pytest.mark.slow
def test_the_aird_adapt_bn_row_calibrates_and_adapts_the_aird_run(
    fake_suite, tmp_path, monkeypatch
):
    from facemoe_jax.evaluate import embed
    from facemoe_jax.interop.load import load_variables
    from facemoe_jax.models import build_model
    from facemoe_jax.models.onnx_graph import BATCHNORM_EPSILON
    from facemoe_jax.train import adapt_bn, calibrate_bn

    settings = fake_suite
    base = study_lfw.base_config(settings)
    base.eval.update(lfw_resolutions="112,12")
    caches = []  # each evaluation's shared LFW embedding cache {(size, path): embedding}
    evaluate_lfw = lfw.evaluate_lfw

    def recording(*args, cache=None, **kwargs):
        if not caches or caches[-1] is not cache:
            caches.append(cache)
        return evaluate_lfw(*args, cache=cache, **kwargs)

    monkeypatch.setattr(lfw, "evaluate_lfw", recording)
    out = str(tmp_path / "study")
    runner.run_study(base, out, recipes=["aird_adapt_bn"], settings=settings, suite=study_lfw.LFW)
    rows = {r["recipe"]: r for r in json.load(open(os.path.join(out, "results.json")))["rows"]}
    assert rows["aird_adapt_bn"]["start"] == "aird" and rows["aird_adapt_bn"]["steps"] == 0
    plain, ours = caches  # the aird row's evaluation, then aird_adapt_bn's

    # The reference: the aird run's weights, BatchNorms inserted and calibrated on every
    # training person's image (18 < 512), each set of LFW images (one size, one call of the
    # evaluation's `embed`) adapted on its own images, with one shared cache as the suite's.
    recipe = study_lfw.RECIPES["aird_adapt_bn"]
    aird_dir = runner.run_dir(out, 0, "aird")
    config = study_lfw.adaptation_config(base, recipe, settings, 0, aird_dir, {})
    loaded = load_variables(aird_dir, config)
    model = build_model(config.model)
    hr = calibrate_bn.hr_images(config, 512, seed=0)
    assert len(hr) == TRAIN_PEOPLE * 3
    variables = calibrate_bn.calibrated_variables(
        model, loaded.variables, hr, 64, BATCHNORM_EPSILON
    )
    adaptation = adapt_bn.BatchNormAdaptation(model, "cumulative", 8, flip_test=False)
    embed_fn = embed.make_embed_fn(model, flip_test=False)

    def adapted(images, flip_test):
        own = adaptation.adapted_variables(variables, images, 64)
        return embed.embed_images(embed_fn, own, images, 64)

    expected = {}
    for pairs in lfw.config_pairs(config.eval):
        for mode in ("both", "probe"):
            evaluate_lfw(adapted, settings.lfw_dir, pairs, (112, 12), mode, cache=expected)
    assert set(ours) == set(expected) == set(plain)
    for key, row in expected.items():
        np.testing.assert_allclose(ours[key], row, rtol=1e-4, atol=1e-5, err_msg=str(key))

    # Every embedding, adapted (it equals the reference), differs from the aird row's.
    assert min(1 - cosine(ours[k], plain[k]) for k in plain if k[0] == 12) > 1e-4


def cosine(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_student_rows_share_every_setting_but_the_experts(fake_suite):
    import jax

    from facemoe_jax.models import build_model

    settings = fake_suite
    base = study_lfw.base_config(settings)
    dense, moe = (
        study_lfw.adaptation_config(base, study_lfw.RECIPES[name], settings, 1, "", {})
        for name in ("student_dense", "student_moe")
    )
    for config in (dense, moe):
        assert config.init_from == "" and config.loss.centre_init == "random"
        assert config.model.name == "vit_moe" and config.model.image_size == 64
        assert config.distill.teacher == os.path.abspath(settings.teacher)
        assert config.distill.teacher_cache == "auto"
        assert config.distill.instance_weight == settings.instance_weight
        assert config.train.num_steps == settings.student_steps
        assert config.optimizer.learning_rate == settings.student_learning_rate
        assert config.data.people_file.endswith("peopleDevTrain.txt")
    assert (dense.model.moe_layers, moe.model.moe_layers) == ("none", "every:2")
    assert moe.model.top_k == 1 and moe.loss.balance_coef > 0 and dense.loss.balance_coef == 0
    a, b = runner.settings_changed(dense), runner.settings_changed(moe)
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {
        "model.moe_layers",
        "loss.z_coef",
        "loss.balance_coef",
    }
    # The same active FLOPs: an expert is the dense MLP's shape, and a token meets one expert.
    shapes = {}
    for name, config in (("dense", dense), ("moe", moe)):
        model = build_model(config.model)
        images = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
        params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]
        shapes[name] = {
            jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(params)
        }
    dense_mlp = sorted(
        v for k, v in shapes["dense"].items() if "blocks_1" in k and "mlp" in k.lower()
    )
    experts = sorted(v[1:] for k, v in shapes["moe"].items() if "blocks_1" in k and "expert" in k)
    assert dense_mlp and experts == dense_mlp
    assert {v[0] for k, v in shapes["moe"].items() if "blocks_1" in k and "expert" in k} == {4}


def test_the_validation_suite_trains_without_the_held_out_people(fake_suite, tmp_path):
    import dataclasses

    from facemoe_jax.data.folder import read_people_file
    from facemoe_jax.data.lfw_pairs import read_pairs

    names = [f"P{k}" for k in range(TRAIN_PEOPLE)]
    settings = dataclasses.replace(
        fake_suite, validation_dir=str(tmp_path / "split"), validation_share=0.7
    )
    # 6 training people x 3 images: 4 held out, pairs in 2 folds of 2 people
    from facemoe_jax.data import validation_split

    people, pairs = validation_split.write_split(
        os.path.join(settings.lfw_dir, "aligned112"),
        names,
        settings.validation_dir,
        share=0.7,
        folds=2,
        per_class=2,
    )
    train = read_people_file(people)
    held = {p.split("/")[0] for pair in read_pairs(pairs).pairs for p in pair}
    assert len(train) == 2 and not held & set(train) and held <= set(names)
    config = study_lfw.adaptation_config(
        study_lfw.base_config(settings, split=(people, pairs)),
        study_lfw.RECIPES["aird"],
        settings,
        0,
        settings.teacher,
        {},
    )
    assert config.data.people_file == people and config.eval.lfw_pairs == pairs
    assert config.eval.lfw_degrade == "both" and config.data.num_classes == 2


def test_set_changes_settings_by_their_type():
    settings = study_lfw.LfwSettings()
    changed = runner.with_settings(settings, ["learning_rate=5e-4", "steps=7"])
    assert (changed.learning_rate, changed.steps) == (5e-4, 7)
    with pytest.raises(ValueError, match="--set 'rate=1'.*learning_rate"):
        runner.with_settings(settings, ["rate=1"])
    with pytest.raises(ValueError, match="'x' is not a int"):
        runner.with_settings(settings, ["steps=x"])


def test_a_setting_at_its_default_does_not_change_a_fingerprint(fake_suite):
    config = study_lfw.base_config(fake_suite)
    changed = runner.settings_changed(config)
    assert changed["model.name"] == "onnx" and "distill.teacher_cache" not in changed
    assert "model.num_experts" not in changed  # at its default
    config.distill.teacher_cache = "auto"
    assert runner.settings_changed(config)["distill.teacher_cache"] == "auto"


# ---- the `ri` row: a quality head on aird's frozen encoder


def test_the_ri_row_trains_only_a_quality_head_on_aird(fake_suite):
    import jax

    from facemoe_jax.models import build_model
    from facemoe_jax.parallel.sharding import path_name
    from facemoe_jax.train import optimizer as optimizer_lib
    from facemoe_jax.train import state as state_lib
    from facemoe_jax.train import trainable

    settings = fake_suite
    recipe = study_lfw.RECIPES["ri"]
    assert recipe.start == "aird" and recipe.train
    assert [r.name for r in runner.order_rows(["ri"], study_lfw.RECIPES)] == ["aird", "ri"]
    base = study_lfw.base_config(settings)
    config = study_lfw.adaptation_config(base, recipe, settings, 1, "/runs/aird", {})
    assert config.init_from == "/runs/aird" and config.init_classifier  # aird's centres
    assert config.loss.centre_init == "random"  # not imprinted (exclusive with the above)
    assert config.model.quality_head and not config.model.perceptibility_attention
    assert config.recognizability.enabled and config.recognizability.diversion_weight == 0
    assert config.recognizability.ui_images == settings.batch_size == 4
    assert config.optimizer.learning_rate == settings.quality_learning_rate
    assert config.eval.lfw_quality == "pairsDevTest.txt" and config.eval.lfw_pairs == ""
    assert config.eval.quality_fmr == study_lfw.QUALITY_FMR
    model = build_model(config.model)
    optimizer, _ = optimizer_lib.build_optimizer(config.optimizer, 1)
    params = state_lib.abstract_train_state(model, optimizer, config).params
    mask = trainable.trainable_mask(params, config.train.trainable)
    trained = {path_name(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert trained and all(p.startswith("encoder/quality_head/") for p in trained)
    assert 0 < runner.trainable_share(config) < 1  # the tiny graph is smaller than the head


def test_the_quality_table_shows_ratios_as_they_are():
    entry = {
        "trainable_share": 0.1,
        "trained": True,
        "seeds": 1,
        "minutes": 2.0,
        "lfw_quality/fnmr_reject0": (0.05, 0.0),
        "lfw_quality/spearman_rho": (0.8123, 0.0),
    }
    table = runner.format_table({"ri": entry}, study_lfw.QUALITY_COLUMNS)
    assert "| ri | 10.0 % | - | 5.0 | - |" in table and "| 0.812 | - | 2.0 |" in table
    assert "rho(q, px)" in table.splitlines()[0]


@pytest.mark.slow
def test_the_ri_row_end_to_end(fake_suite, tmp_path, capsys):
    from facemoe_jax.interop.load import load_variables

    settings = fake_suite
    base = study_lfw.base_config(settings)
    out = tmp_path / "study"
    summary = runner.run_study(
        base, str(out), recipes=["ri"], settings=settings, suite=study_lfw.LFW
    )
    assert list(summary) == ["aird", "ri"]
    ri = summary["ri"]
    assert 0 < ri["trainable_share"] < 1 and "lfw_view1@12px/accuracy" not in ri
    assert {f"lfw_quality/{m}" for m in ("fnmr_reject20_quality", "spearman_rho")} <= set(ri)
    # aird's encoder, unchanged; a trained head beside it.
    aird = load_variables(str(out / "seed0" / "aird")).variables["params"]
    trained = load_variables(str(out / "seed0" / "ri")).variables["params"]
    assert set(trained) == set(aird) | {"quality_head"}
    for name, value in aird.items():
        np.testing.assert_array_equal(np.asarray(trained[name]), np.asarray(value), name)
    assert (out / "seed0" / "ri" / "eval" / "lfw_quality.json").is_file()
    table = (out / "table.md").read_text()
    main, quality_table = table.split("Quality head (`ri`)")
    assert "| ri |" in main and "| aird |" not in quality_table and "| ri |" in quality_table
    # The export writes the graph (the embedding) and says that the head is not in it.
    from facemoe_jax.export.workdir import export_workdir

    export_workdir(str(out / "seed0" / "ri"), str(tmp_path / "export"))
    assert "quality head (quality_head) is not written" in capsys.readouterr().out
    assert (tmp_path / "export" / "model.onnx").is_file()
