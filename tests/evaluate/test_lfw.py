"""LFW from its aligned folder and pairs files: parsing, degradation, both views, CLI, suite."""

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest

from facemoe_jax.data import lfw_pairs
from facemoe_jax.evaluate import lfw, verification

REALFACES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "..",
    "shared",
    "realfaces",
)
REAL_LFW = os.path.join(REALFACES, "lfw")
ONNX_MODEL = os.path.join(REALFACES, "models", "faceplugin_fr_feature.onnx")
needs_realfaces = pytest.mark.skipif(
    not os.path.isdir(REAL_LFW), reason=f"real faces not here ({os.path.abspath(REALFACES)})"
)


# ---- a small fake LFW: people whose images share a pattern, written as JPEG crops


def make_fake_lfw(root, people=6, images_per_person=4, size=112, seed=0):
    """root/aligned112/P{k}/P{k}_000j.jpg: a smooth pattern per person plus per-image noise."""
    rng = np.random.default_rng(seed)
    names = [f"P{k}" for k in range(people)]
    for name in names:
        os.makedirs(os.path.join(root, lfw_pairs.ALIGNED_FOLDER, name))
        base = cv2.resize(rng.uniform(0, 255, (6, 6, 3)), (size, size))
        for j in range(1, images_per_person + 1):
            image = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(
                os.path.join(root, lfw_pairs.ALIGNED_FOLDER, name, f"{name}_{j:04d}.jpg"), image
            )
    return names


def write_pairs_file(path, sets, one_set_header=False):
    """sets: [(same [(name, i, j)], different [(name1, i, name2, j)])], equal counts."""
    per_class = len(sets[0][0])
    header = f"{per_class}" if one_set_header else f"{len(sets)}\t{per_class}"
    lines = [header]
    for same, different in sets:
        lines += ["\t".join(map(str, row)) for row in same + different]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def random_sets(names, num_sets, per_class, images_per_person=4, seed=1):
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(num_sets):
        same = []
        for _ in range(per_class):
            i, j = rng.choice(np.arange(1, images_per_person + 1), 2, replace=False)
            same.append((names[rng.integers(len(names))], int(i), int(j)))
        different = []
        for _ in range(per_class):
            a, b = rng.choice(len(names), 2, replace=False)
            i, j = rng.integers(1, images_per_person + 1, 2)
            different.append((names[a], int(i), names[b], int(j)))
        sets.append((same, different))
    return sets


def toy_embed(images, flip_test):
    """A deterministic embedding: the mean-free 8x8 grey thumbnail (plus its mirror's)."""

    def thumbs(x):
        grey = x.astype(np.float64).mean(axis=3)
        small = np.stack([cv2.resize(g, (8, 8), interpolation=cv2.INTER_AREA) for g in grey])
        flat = small.reshape(len(x), -1)
        return flat - flat.mean(axis=1, keepdims=True)

    emb = thumbs(images)
    return emb + thumbs(images[:, :, ::-1]) if flip_test else emb


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def reference_distances(root, pairs, size, model_size, embed, probe=False):
    """Squared distances of the pairs, every step spelled out with cv2 and numpy."""

    def prepared(path, degrade):
        image = read_rgb(os.path.join(root, lfw_pairs.ALIGNED_FOLDER, path))
        if degrade and size < 112:
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        if image.shape[0] != model_size:
            up = model_size > image.shape[0]
            image = cv2.resize(
                image,
                (model_size, model_size),
                interpolation=cv2.INTER_CUBIC if up else cv2.INTER_AREA,
            )
        return image

    first = embed(np.stack([prepared(a, not probe) for a, _ in pairs]), False)
    second = embed(np.stack([prepared(b, True) for _, b in pairs]), False)
    first = first / np.linalg.norm(first, axis=1, keepdims=True)
    second = second / np.linalg.norm(second, axis=1, keepdims=True)
    return 2.0 - 2.0 * np.sum(first * second, axis=1)


# ---- read_pairs


def test_read_pairs_both_formats(tmp_path):
    view2 = tmp_path / "pairs.txt"
    view2.write_text("2\t1\nAl\t1\t2\nAl\t1\tBo\t3\n\nBo\t2\t3\nBo\t1\tAl\t2\n")
    pairs, issame, folds = lfw_pairs.read_pairs(str(view2))
    assert pairs == [
        ("Al/Al_0001.jpg", "Al/Al_0002.jpg"),
        ("Al/Al_0001.jpg", "Bo/Bo_0003.jpg"),
        ("Bo/Bo_0002.jpg", "Bo/Bo_0003.jpg"),
        ("Bo/Bo_0001.jpg", "Al/Al_0002.jpg"),
    ]
    assert issame.tolist() == [True, False, True, False] and folds.tolist() == [0, 0, 1, 1]
    view1 = tmp_path / "pairsDevTest.txt"
    view1.write_text("2\nAl 1 2\nBo 10 11\nAl 1 Bo 3\nBo 2 Al 4\n")
    pairs, issame, folds = lfw_pairs.read_pairs(str(view1))
    assert pairs[1] == ("Bo/Bo_0010.jpg", "Bo/Bo_0011.jpg")
    assert issame.tolist() == [True, True, False, False] and folds.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "content, where",
    [
        ("", "empty pairs file"),
        ("ten 300\nAl 1 2\n", "line 1: expected the header"),
        ("1 1\nAl 1 Bo 2\nAl 1 2\n", "line 2: expected a same-person"),
        ("1 1\nAl 1 2\nAl 1 2\n", "line 3: expected a different-person"),
        ("1 1\nAl 1 x\nAl 1 Bo 2\n", "line 2: image number 'x'"),
        ("1 1\nAl 1 0\nAl 1 Bo 2\n", "line 2: image number '0'"),
        ("1 1\nAl 1 2\nAl 1 Bo 2\nAl 1 3\n", "line 4: more pairs than the header"),
        ("1 2\nAl 1 2\nAl 1 3\nAl 1 Bo 2\n", "3 pair lines, the header announces 4"),
    ],
)
def test_malformed_pairs_files_name_file_and_line(tmp_path, content, where):
    path = tmp_path / "pairs.txt"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        lfw_pairs.read_pairs(str(path))
    assert str(path) in str(error.value) and where in str(error.value)


@needs_realfaces
def test_read_the_real_pairs_files():
    pairs, issame, folds = lfw_pairs.read_pairs(os.path.join(REAL_LFW, "pairs.txt"))
    assert len(pairs) == 6000 and np.bincount(folds).tolist() == [600] * 10
    assert [int(issame[folds == f].sum()) for f in range(10)] == [300] * 10
    # The .bin protocol's contiguous folds are exactly pairs.txt's sets.
    for f, idx in enumerate(verification.contiguous_folds(6000, 10)):
        assert (folds[idx] == f).all()
    for name, count in (("pairsDevTrain.txt", 2200), ("pairsDevTest.txt", 1000)):
        pairs, issame, folds = lfw_pairs.read_pairs(os.path.join(REAL_LFW, name))
        assert len(pairs) == count and issame.sum() == count // 2 and (folds == 0).all()
    assert pairs[0] == ("Abdullah_Gul/Abdullah_Gul_0013.jpg", "Abdullah_Gul/Abdullah_Gul_0014.jpg")


# ---- degrade


def test_degrade_is_area_down_then_cubic_up():
    images = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), np.uint8)
    out = lfw.degrade(images, 12, 112)
    small = cv2.resize(images[1], (12, 12), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(
        out[1], cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC)
    )
    assert out.dtype == np.uint8 and out.shape == (2, 112, 112, 3)
    np.testing.assert_array_equal(lfw.degrade(images, 112, 112), images)  # no-op
    np.testing.assert_array_equal(lfw.degrade(images, 300, 112), images)
    np.testing.assert_array_equal(  # a larger model input: cubic up
        lfw.degrade(images, 112, 120)[0],
        cv2.resize(images[0], (120, 120), interpolation=cv2.INTER_CUBIC),
    )
    np.testing.assert_array_equal(  # a smaller model input: area down
        lfw.degrade(images, 200, 48)[0],
        cv2.resize(images[0], (48, 48), interpolation=cv2.INTER_AREA),
    )
    with pytest.raises(ValueError, match="uint8"):
        lfw.degrade(images.astype(np.float32), 12, 112)


# ---- evaluate_lfw on the fake LFW


@pytest.fixture
def fake_lfw(tmp_path):
    names = make_fake_lfw(tmp_path)
    return tmp_path, names


class CountingEmbed:
    def __init__(self, embed=toy_embed):
        self.embed, self.images, self.flips = embed, 0, set()

    def __call__(self, images, flip_test):
        self.images += len(images)
        self.flips.add(flip_test)
        return self.embed(images, flip_test)


@pytest.mark.parametrize("mode", ["both", "probe"])
def test_view2_matches_a_direct_computation(fake_lfw, mode):
    root, names = fake_lfw
    write_pairs_file(root / "pairs.txt", random_sets(names, num_sets=3, per_class=4))
    pairs, issame, folds = lfw_pairs.read_pairs(str(root / "pairs.txt"))
    embed = CountingEmbed()
    result = lfw.evaluate_lfw(
        embed, str(root), "pairs.txt", (112, 16), mode, model_size=64, thresholds="exact"
    )
    assert result["protocol"] == "view2" and result["pairs"] == 24
    assert list(result["rows"]) == (
        ["lfw_view2@112px", "lfw_view2@16px"]
        if mode == "both"
        else ["lfw_view2@probe112px", "lfw_view2@probe16px"]
    )
    unique = result["images"]
    assert unique == len({p for pair in pairs for p in pair})
    # Each image once per resolution; "probe" shares the undegraded faces across resolutions.
    seconds = len({b for _, b in pairs})
    assert embed.images == (2 * unique if mode == "both" else unique + seconds)
    for size, row in zip((112, 16), result["rows"].values()):
        d = reference_distances(root, pairs, size, 64, toy_embed, probe=mode == "probe")
        expected = verification.ten_fold_accuracy(d, issame, thresholds="exact", folds=folds)
        assert row["resolution"] == size
        for key in ("accuracy", "accuracy_std", "best_threshold"):
            assert row[key] == pytest.approx(expected[key], abs=1e-12)
        for key, far in lfw.FARS.items():
            assert row[key] == pytest.approx(verification.tar_at_far(1 - d / 2, issame, far))
    assert result["rows"][next(iter(result["rows"]))]["accuracy"] > 0.9  # people differ


def test_view1_threshold_comes_from_the_train_file(fake_lfw):
    root, names = fake_lfw
    (root / "sub").mkdir()
    write_pairs_file(root / "sub" / "pairsDevTest.txt", random_sets(names, 1, 5, seed=2), True)
    write_pairs_file(root / "sub" / "pairsDevTrain.txt", random_sets(names, 1, 8, seed=3), True)
    aligned = str(root / lfw_pairs.ALIGNED_FOLDER)  # the aligned folder itself; pairs by full path
    embed = CountingEmbed()
    result = lfw.evaluate_lfw(
        embed,
        aligned,
        str(root / "sub" / "pairsDevTest.txt"),
        (10,),
        flip_test=True,
        model_size=112,
        thresholds="exact",
    )
    assert embed.flips == {True}
    assert result["protocol"] == "view1"
    assert result["threshold_pairs_file"] == str(root / "sub" / "pairsDevTrain.txt")
    row = result["rows"]["lfw_view1@10px"]

    def distances(name):
        pairs, issame, _ = lfw_pairs.read_pairs(str(root / "sub" / name))
        return reference_distances(root, pairs, 10, 112, toy_embed_flip), issame

    def toy_embed_flip(images, _):
        return toy_embed(images, True)

    train_d, train_same = distances("pairsDevTrain.txt")
    test_d, test_same = distances("pairsDevTest.txt")
    # The best cut between the train distances (accept <= c), the most accepting of the best.
    candidates = np.r_[-np.inf, np.sort(train_d)]
    accuracies = [np.mean((train_d <= c) == train_same) for c in candidates]
    cut = candidates[len(accuracies) - 1 - int(np.argmax(accuracies[::-1]))]
    assert row["best_threshold"] == pytest.approx(cut)
    assert row["train_accuracy"] == pytest.approx(max(accuracies))
    assert row["accuracy"] == pytest.approx(np.mean((test_d <= cut) == test_same))
    assert "accuracy_std" not in row
    assert row["tar@far=1e-3"] == pytest.approx(
        verification.tar_at_far(1 - test_d / 2, test_same, 1e-3)
    )
    grid = lfw.evaluate_lfw(
        toy_embed_flip, aligned, str(root / "sub" / "pairsDevTest.txt"), (10,), thresholds="grid"
    )
    assert grid["rows"]["lfw_view1@10px"]["best_threshold"] == pytest.approx(
        verification.grid_threshold(train_d, train_same)
    )


def write_people_file(path, names):
    lines = [str(len(names))] + [f"{name}\t4" for name in names]
    path.write_text("\n".join(lines) + "\n")


def test_people_filter_keeps_the_pairs_among_those_people(fake_lfw):
    root, names = fake_lfw
    write_pairs_file(root / "pairs.txt", random_sets(names, num_sets=4, per_class=6))
    write_people_file(root / "some.txt", names[:4])
    pairs, issame, folds = lfw_pairs.read_pairs(str(root / "pairs.txt"))
    kept = [
        k
        for k, (a, b) in enumerate(pairs)
        if a.split("/")[0] in names[:4] and b.split("/")[0] in names[:4]
    ]
    assert 0 < len(kept) < len(pairs)
    result = lfw.evaluate_lfw(
        toy_embed, str(root), "pairs.txt@some.txt", (112,), thresholds="exact", model_size=64
    )
    assert result["label"] == "view2_some" and result["pairs"] == len(kept)
    row = result["rows"]["lfw_view2_some@112px"]
    d = reference_distances(root, [pairs[k] for k in kept], 112, 64, toy_embed)
    expected = verification.ten_fold_accuracy(
        d, issame[kept], thresholds="exact", folds=folds[kept]
    )
    assert row["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    with pytest.raises(ValueError, match="missing.txt"):
        lfw.load_protocol(str(root), "pairs.txt@missing.txt")
    write_people_file(root / "one.txt", names[:1])  # only same-person pairs among one person
    with pytest.raises(ValueError, match="needs both kinds"):
        lfw.load_protocol(str(root), "pairs.txt@one.txt")


def test_a_shared_cache_embeds_each_image_once_per_size(fake_lfw):
    root, names = fake_lfw
    write_pairs_file(root / "pairs.txt", random_sets(names, num_sets=2, per_class=4))
    write_people_file(root / "some.txt", names[:4])
    embed, cache = CountingEmbed(), {}
    runs = [("pairs.txt", "both"), ("pairs.txt", "probe"), ("pairs.txt@some.txt", "both")]
    results = [
        lfw.evaluate_lfw(embed, str(root), f, (112, 12), m, model_size=64, cache=cache)
        for f, m in runs
    ]
    unique = results[0]["images"]
    assert embed.images == 2 * unique  # the later calls found every embedding in the cache
    alone = lfw.evaluate_lfw(toy_embed, str(root), "pairs.txt", (112, 12), "probe", model_size=64)
    assert results[1]["rows"] == alone["rows"]


def test_missing_files_are_named(fake_lfw):
    root, names = fake_lfw
    write_pairs_file(root / "pairs.txt", [([("P0", 1, 9)], [("P0", 1, "P1", 1)])] * 2)
    with pytest.raises(ValueError) as error:
        lfw.evaluate_lfw(toy_embed, str(root), "pairs.txt")
    message = str(error.value)
    assert os.path.join("P0", "P0_0009.jpg") in message and str(root / "pairs.txt") in message
    write_pairs_file(root / "pairsDevTest.txt", [([("P0", 1, 2)], [("P0", 1, "P1", 1)])], True)
    with pytest.raises(ValueError, match="pairsDevTrain.txt beside it"):
        lfw.evaluate_lfw(toy_embed, str(root), "pairsDevTest.txt")
    with pytest.raises(ValueError, match="not found"):
        lfw.evaluate_lfw(toy_embed, str(root), "nope.txt")
    with pytest.raises(ValueError, match="not one of"):
        lfw.evaluate_lfw(toy_embed, str(root), "pairs.txt", degrade_mode="gallery")
    with pytest.raises(ValueError, match="not one of"):
        lfw.evaluate_lfw(toy_embed, str(root), "pairs.txt", thresholds="best")


# ---- the command line


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as done:
        lfw.main(args)
    captured = capsys.readouterr()
    return done.value.code, captured.err.strip().splitlines()


def test_cli_errors_are_one_line(fake_lfw, capsys):
    root, names = fake_lfw
    write_pairs_file(root / "pairs.txt", random_sets(names, 2, 2))
    (root / "bad.txt").write_text("2 2\nP0 1\n")
    write_pairs_file(root / "gone.txt", [([("Nobody", 1, 2)], [("P0", 1, "P1", 1)])] * 2)
    cases = [
        (["--model", str(root / "none"), "--lfw", str(root)], "does not exist"),
        (["--model", str(root), "--lfw", str(root), "--pairs", "bad.txt"], "bad.txt, line 2"),
        (["--model", str(root), "--lfw", str(root), "--pairs", "gone.txt"], "Nobody_0001.jpg"),
        (["--model", str(root), "--lfw", str(root / "x")], "not a directory"),
        (["--model", str(root), "--lfw", str(root), "--resolutions", "1,a"], "--resolutions"),
        (["--model", str(root), "--lfw", str(root), "--input-mean", "127"], "for ONNX models"),
    ]
    if importlib.util.find_spec("onnx"):  # ONNX models that cannot be imported
        from onnx import helper as onnx_helper

        from tests.models.test_onnx_graph import write_graph

        unsupported = write_graph(
            root / "topk.onnx",
            [
                onnx_helper.make_node("NonZero", ["x"], ["nz"], name="route"),
                onnx_helper.make_node("Flatten", ["x"], ["y"]),
            ],
            [],
        )
        truncated = root / "cut.onnx"
        truncated.write_bytes(open(unsupported, "rb").read()[:40])
        cases += [
            (["--model", unsupported, "--lfw", str(root)], "operator 'NonZero' (node 'route'"),
            (["--model", str(truncated), "--lfw", str(root)], "cut.onnx: not a readable ONNX"),
        ]
    for args, message in cases:
        code, lines = run_cli(args, capsys)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("error: ") and message in lines[0], lines


def test_cli_table_and_json(fake_lfw, capsys, monkeypatch):
    from facemoe_jax.encoder import FaceEncoder

    root, names = fake_lfw
    write_pairs_file(root / "pairs.txt", random_sets(names, 2, 3))

    class FakeEncoder:
        image_size = 48

        def embed(self, images, flip_test, batch_size):
            assert images.shape[1:] == (48, 48, 3) and batch_size == 8
            return toy_embed(images, flip_test)

    monkeypatch.setattr(
        FaceEncoder, "from_checkpoint", classmethod(lambda cls, p, config=None: FakeEncoder())
    )
    out = root / "out" / "lfw.json"
    lfw.main(
        [
            "--model",
            str(root),
            "--lfw",
            str(root),
            "--resolutions",
            "112,12",
            "--no-flip",
            "--json",
            str(out),
            "--batch-size",
            "8",
        ]
    )
    stdout = capsys.readouterr().out
    assert "112 px" in stdout and "12 px" in stdout and "TAR@FAR=1e-3" in stdout
    saved = json.loads(out.read_text())
    assert saved["flip_test"] is False and saved["model_size"] == 48
    assert set(saved["rows"]) == {"lfw_view2@112px", "lfw_view2@12px"}
    expected = lfw.evaluate_lfw(toy_embed, str(root), "pairs.txt", (12,), model_size=48)
    assert saved["rows"]["lfw_view2@12px"] == expected["rows"]["lfw_view2@12px"]


# ---- config.eval and the evaluation suite


def test_check_config_names_the_field(fake_lfw, tmp_path):
    from configs import common

    root, names = fake_lfw
    write_pairs_file(root / "pairsDevTest.txt", random_sets(names, 1, 2), True)
    write_pairs_file(root / "pairsDevTrain.txt", random_sets(names, 1, 2), True)
    ev = common.get_base_config().eval
    lfw.check_config(ev)  # lfw_dir "": nothing to check
    ev.lfw_dir = str(root)
    lfw.check_config(ev)
    for field, value, message in [
        ("lfw_dir", str(tmp_path / "none"), "config.eval.lfw_dir"),
        ("lfw_resolutions", "112,x", "config.eval.lfw_resolutions"),
        ("lfw_resolutions", "", "config.eval.lfw_resolutions"),
        ("lfw_degrade", "gallery", "config.eval.lfw_degrade"),
        ("lfw_pairs", "pairs.txt", "config.eval.lfw_dir / lfw_pairs"),
    ]:
        bad = ev.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ValueError, match=message):
            lfw.check_config(bad)


def test_suite_adds_the_lfw_rows(fake_lfw, tiny_model, tmp_path):
    from facemoe_jax.evaluate import suite
    from tests.evaluate.test_suite import RecordingWriter

    root, names = fake_lfw
    write_pairs_file(root / "pairsDevTest.txt", random_sets(names, 1, 3), True)
    write_pairs_file(root / "pairsDevTrain.txt", random_sets(names, 1, 4, seed=5), True)
    config, model, variables = tiny_model
    config = config.copy_and_resolve_references()
    config.eval.update(
        synthetic_pairs=0,
        routing_map_faces=0,
        synthetic_tinyface_identities=0,
        lfw_dir=str(root),
        lfw_resolutions="112,8",
        lfw_degrade="probe",
    )
    suite.check_eval_config(config)
    workdir = tmp_path / "run"
    results = suite.run_evaluations(model, variables, config, str(workdir), 7, RecordingWriter())
    assert set(results) == {"lfw_view1@probe112px", "lfw_view1@probe8px"}
    # Several pairs files and both modes in one evaluation.
    write_pairs_file(root / "pairs.txt", random_sets(names, num_sets=2, per_class=3))
    write_people_file(root / "some.txt", names[:4])
    config.eval.update(lfw_pairs="pairsDevTest.txt, pairs.txt@some.txt", lfw_degrade="both,probe")
    suite.check_eval_config(config)
    many = suite.run_evaluations(model, variables, config, str(workdir), 8, RecordingWriter())
    assert many["lfw_view1@probe8px"] == results["lfw_view1@probe8px"]
    assert {"lfw_view1@8px", "lfw_view2_some@112px", "lfw_view2_some@probe8px"} <= set(many)
    config.eval.lfw_degrade = "both,side"
    with pytest.raises(ValueError, match="config.eval.lfw_degrade"):
        suite.check_eval_config(config)
    saved = json.loads((workdir / "eval" / "results.json").read_text())
    assert saved["lfw_view1@probe8px"] == results["lfw_view1@probe8px"]
    assert (workdir / "eval" / "accuracy_vs_resolution.png").exists()


# ---- real faces and the real recognizer (onnxruntime)


def onnx_embed_fn():
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(ONNX_MODEL, options, providers=["CPUExecutionProvider"])

    def embed(images, flip_test):
        assert not flip_test
        x = ((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2)
        return np.stack([session.run(None, {"input": x[k : k + 1]})[0][0] for k in range(len(x))])

    return embed


@needs_realfaces
def test_real_pairs_match_onnxruntime_by_hand(tmp_path):
    """20 real pairs of pairs.txt (2 folds from its first two sets): the protocol at 112 and 12 px
    against cv2 + onnxruntime + numpy by hand."""
    lines = open(os.path.join(REAL_LFW, "pairs.txt")).read().splitlines()[1:]
    sets = [lines[600 * f : 600 * f + 5] + lines[600 * f + 300 : 600 * f + 305] for f in (0, 1)]
    (tmp_path / "pairs.txt").write_text("2\t5\n" + "\n".join(sets[0] + sets[1]) + "\n")
    os.symlink(
        os.path.abspath(os.path.join(REAL_LFW, lfw_pairs.ALIGNED_FOLDER)),
        tmp_path / lfw_pairs.ALIGNED_FOLDER,
    )
    embed = onnx_embed_fn()
    result = lfw.evaluate_lfw(embed, str(tmp_path), "pairs.txt", (112, 12), thresholds="grid")
    pairs, issame, folds = lfw_pairs.read_pairs(str(tmp_path / "pairs.txt"))
    for size, row in zip((112, 12), result["rows"].values()):
        d = reference_distances(tmp_path, pairs, size, 112, embed)
        # Two folds by hand: each fold's first best threshold on the other one.
        accuracies = []
        for f in (0, 1):
            train, test = folds != f, folds == f
            grid = np.arange(0, 4, 0.01)
            t = grid[int(np.argmax([np.mean((d[train] < t) == issame[train]) for t in grid]))]
            accuracies.append(np.mean((d[test] < t) == issame[test]))
        assert row["accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
        assert row["accuracy_std"] == pytest.approx(np.std(accuracies), abs=1e-12)
        if size == 112:  # a real recognizer: same-person pairs far closer at full size
            assert d[issame].max() < np.median(d[~issame])


@needs_realfaces
def test_real_view1_test_file_against_a_brute_force_protocol():
    """View 1's test file on the real crops, its threshold chosen on pairsDevTrain.txt, at 112 and
    12 px, against every step spelled out here. A cheap fixed embedding (grey thumbnails) takes all
    4,992 images of both files through in seconds; the real recognizer's figures on this file
    (98.6 % at 112 px) follow from its ONNX parity (tests/test_encoder_onnx.py) and are measured
    with the CLI (docs/real_faces.md)."""
    result = lfw.evaluate_lfw(toy_embed, REAL_LFW, "pairsDevTest.txt", (112, 12))
    assert result["pairs"] == 1000 and result["images"] == 4992
    grid = np.arange(0, 4, 0.01)
    for size in (112, 12):
        distances = {}
        for name in ("pairsDevTrain.txt", "pairsDevTest.txt"):
            pairs, issame, _ = lfw_pairs.read_pairs(os.path.join(REAL_LFW, name))
            distances[name] = reference_distances(REAL_LFW, pairs, size, 112, toy_embed), issame
        train_d, train_same = distances["pairsDevTrain.txt"]
        cut = grid[int(np.argmax([np.mean((train_d < t) == train_same) for t in grid]))]
        test_d, test_same = distances["pairsDevTest.txt"]
        row = result["rows"][f"lfw_view1@{size}px"]
        assert row["best_threshold"] == pytest.approx(cut)
        assert row["accuracy"] == pytest.approx(np.mean((test_d < cut) == test_same))
        assert row["accuracy"] > 0.55  # thumbnails of real faces: better than chance
