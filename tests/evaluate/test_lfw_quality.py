"""The quality head's evaluation on LFW pairs (config.eval.lfw_quality): the faces of a pairs
file, the numbers against a direct computation, the suite's entry and its checks."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from facemoe_jax.data import degrade
from facemoe_jax.evaluate import lfw, quality
from facemoe_jax.evaluate import recognizability as ri_eval
from tests.evaluate.test_lfw import make_fake_lfw, random_sets, read_rgb, toy_embed
from tests.evaluate.test_lfw import write_pairs_file


@pytest.fixture
def pairs_lfw(tmp_path):
    names = make_fake_lfw(tmp_path, people=8)
    write_pairs_file(tmp_path / "pairsDevTest.txt", random_sets(names, 1, 12), True)
    write_pairs_file(tmp_path / "pairsDevTrain.txt", random_sets(names, 1, 4, seed=5), True)
    return tmp_path


def test_pair_faces_reads_each_test_face_once_at_the_model_size(pairs_lfw):
    faces = lfw.pair_faces(str(pairs_lfw), "pairsDevTest.txt", 48)
    test = lfw.load_protocol(str(pairs_lfw), "pairsDevTest.txt").test
    assert faces.label == "view1" and len(faces.issame) == len(test.pairs) == 24
    assert len(faces.faces) == len({p for pair in test.pairs for p in pair})
    for k in (0, 13):
        a, b = test.pairs[k]
        for path, index in ((a, faces.index_a[k]), (b, faces.index_b[k])):
            expected = lfw.degrade(read_rgb(pairs_lfw / "aligned112" / path)[None], 112, 48)[0]
            np.testing.assert_array_equal(faces.faces[index], expected)
    np.testing.assert_array_equal(faces.issame, test.issame)


def _toy_quality(variables, images):
    """A quality that falls with resolution: the mean absolute horizontal gradient."""
    del variables
    x = np.asarray(images, np.float64).mean(axis=3)
    return np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))


def test_lfw_pair_quality_matches_a_direct_computation(pairs_lfw):
    pairs = lfw.pair_faces(str(pairs_lfw), "pairsDevTest.txt", 112)
    sizes, fmr, seed = (8, 16, 24), 0.1, 3
    metrics, curves, curve = ri_eval.lfw_pair_quality(
        _toy_quality,
        lambda images: toy_embed(images, False),
        None,
        pairs,
        sizes,
        112,
        fmr,
        batch_size=5,
        resolution_faces=7,
        seed=seed,
    )
    faces_a, faces_b = pairs.faces[pairs.index_a], pairs.faces[pairs.index_b]
    # The mixed case by hand: each second face at a seeded draw of 8/16/24/112 px.
    drawn = np.random.default_rng(seed).choice([8, 16, 24, 112], len(faces_b))
    mixed_b = np.stack(
        [f if px == 112 else degrade.to_resolution(f, px) for f, px in zip(faces_b, drawn)]
    )
    for prefix, second in (("", faces_b), ("mixed_", mixed_b)):
        ea, eb = toy_embed(faces_a, False), toy_embed(second, False)
        cos = np.sum(ea * eb, 1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
        head = np.minimum(_toy_quality(None, faces_a), _toy_quality(None, second))
        norm = np.minimum(np.linalg.norm(ea, axis=1), np.linalg.norm(eb, axis=1))
        for key, q in (("quality", head), ("norm", norm)):
            erc = quality.error_versus_reject(cos, pairs.issame, q, fmr)
            assert metrics[f"{prefix}erc_auc_{key}"] == pytest.approx(erc["auc"])
            assert metrics[f"{prefix}fnmr_reject20_{key}"] == pytest.approx(erc["fnmr"][4])
        random = quality.random_rejection(cos, pairs.issame, fmr, seed=seed)
        assert metrics[f"{prefix}erc_auc_random"] == pytest.approx(random["auc"])
        # Nothing rejected: the genuine pairs at or below the FMR threshold.
        threshold = np.quantile(cos[~pairs.issame], 1 - fmr, method="higher")
        assert metrics[f"{prefix}fnmr_reject0"] == pytest.approx(
            np.mean(cos[pairs.issame] <= threshold)
        )
    assert set(curves) == {
        f"{case}: {kind}"
        for case in ("as given", "mixed resolution")
        for kind in ("quality head", "embedding norm", "random")
    }
    # Quality against resolution: 7 faces spread over the file, at 8/16/24 px and full size.
    picked = pairs.faces[np.unique(np.linspace(0, len(pairs.faces) - 1, 7).round().astype(int))]
    q = np.stack(
        [
            _toy_quality(None, np.stack([degrade.to_resolution(f, px) for f in picked]))
            for px in sizes
        ]
        + [_toy_quality(None, picked)]
    )
    resolution = np.repeat([8, 16, 24, 112], len(picked))
    assert metrics["spearman_rho"] == pytest.approx(stats.spearmanr(q.ravel(), resolution)[0])
    assert metrics["spearman_rho"] > 0.5 and curve["pixels"] == [8, 16, 24, 112]
    assert (metrics["pairs"], metrics["faces"], metrics["fmr"]) == (24, 7, fmr)


def test_spread_subset():
    assert ri_eval.spread_subset(10, 4).tolist() == [0, 1, 2, 3]
    assert ri_eval.spread_subset(3, 9).tolist() == [0, 4, 8]


def _quality_model(image_size=48):
    import jax
    import jax.numpy as jnp

    from facemoe_jax.models import build_model
    from tests.conftest import tiny_config

    config = tiny_config()
    config.model.quality_head = True
    model = build_model(config.model)
    x = jnp.zeros((2, image_size, image_size, 3))
    return config, model, model.init({"params": jax.random.key(0)}, x, train=False)


def test_the_suite_runs_it_and_checks_its_fields(pairs_lfw, tmp_path):
    from facemoe_jax.evaluate import suite
    from tests.evaluate.test_suite import RecordingWriter

    config, model, variables = _quality_model()
    config.eval.update(
        synthetic_pairs=0,
        routing_map_faces=0,
        synthetic_tinyface_identities=0,
        lfw_dir=str(pairs_lfw),
        lfw_pairs="",  # no accuracy rows: only the quality evaluation
        lfw_quality="pairsDevTest.txt",
        quality_resolutions="8,16",
        quality_resolution_faces=5,
        quality_fmr=0.1,
        flip_test=False,
    )
    suite.check_eval_config(config)
    workdir = tmp_path / "run"
    writer = RecordingWriter()
    results = suite.run_evaluations(model, variables, config, str(workdir), 3, writer)
    assert set(results) == {"lfw_quality"}
    metrics = results["lfw_quality"]
    assert metrics["pairs"] == 24 and metrics["faces"] == 5
    assert {"fnmr_reject20_quality", "mixed_erc_auc_norm", "spearman_rho"} <= set(metrics)
    assert writer.scalars["eval/lfw_quality/mixed_fnmr_reject20_quality"] == pytest.approx(
        metrics["mixed_fnmr_reject20_quality"]
    )
    out = workdir / "eval"
    saved = json.loads((out / "lfw_quality.json").read_text())
    assert saved["step"] == 3 and saved["fmr"] == 0.1
    erc = saved["error_versus_reject"]["mixed resolution: quality head"]
    assert erc["auc"] == pytest.approx(metrics["mixed_erc_auc_quality"])
    assert len(erc["fnmr"]) == len(erc["reject_fraction"]) == 20
    assert saved["quality_vs_resolution"]["pixels"] == [8, 16, 48]
    for picture in ("error_vs_reject.png", "quality_vs_resolution.png"):
        assert os.path.getsize(out / picture) > 1000
    for field, value, message in [
        ("lfw_dir", "", "needs config.eval.lfw_dir"),
        ("lfw_quality", "pairsDevTest.txt,pairs.txt", "name one pairs file"),
        ("lfw_quality", "nope.txt", "config.eval.lfw_quality='nope.txt'"),
    ]:
        bad = config.copy_and_resolve_references()
        bad.eval[field] = value
        with pytest.raises(ValueError, match=message):
            suite.check_eval_config(bad)
    config.model.quality_head = False
    with pytest.raises(ValueError, match="config.model.quality_head is False"):
        suite.check_eval_config(config)
    config.eval.lfw_quality = ""  # and then an empty lfw_pairs names nothing to evaluate
    with pytest.raises(ValueError, match="config.eval.lfw_pairs"):
        suite.check_eval_config(config)
