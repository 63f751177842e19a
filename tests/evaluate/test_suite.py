"""The whole evaluation suite on a tiny model: every format, results.json, pictures, writers."""

import json
import re

import cv2
import numpy as np
import pytest
import scipy.io

from facemoe_jax.evaluate import bin as bin_lib
from facemoe_jax.evaluate import ijb, suite


class RecordingWriter:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def write_scalars(self, step, scalars):
        self.scalars.update(scalars)

    def write_images(self, step, images):
        self.images.update(images)


def _tiny_ijb(root):
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    rng = np.random.default_rng(0)
    landmarks = (ijb.ARCFACE_TEMPLATE_112 + 8).reshape(-1)
    with (
        open(root / "meta" / "ijbc_face_tid_mid.txt", "w") as faces,
        open(root / "meta" / "ijbc_name_5pts_score.txt", "w") as points,
    ):
        for i in range(8):
            name = f"{i}.jpg"
            cv2.imwrite(
                str(root / "loose_crop" / name), rng.integers(0, 256, (130, 128, 3), np.uint8)
            )
            faces.write(f"{name} {i // 2} {i}\n")
            points.write(" ".join([name, *map(str, landmarks), "0.9"]) + "\n")
    with open(root / "meta" / "ijbc_template_pair_label.txt", "w") as f:
        f.write("0 1 1\n0 2 0\n1 3 0\n2 3 1\n0 3 0\n1 2 1\n")


def _tiny_tinyface(root):
    rng = np.random.default_rng(1)
    for folder, names in (
        ("Probe", ["1_0.png", "2_0.png"]),
        ("Gallery_Match", ["1_1.png", "2_1.png"]),
        ("Gallery_Distractor", ["x_0.png", "x_1.png", "x_2.png"]),
    ):
        (root / folder).mkdir(parents=True)
        for name in names:
            cv2.imwrite(str(root / folder / name), rng.integers(0, 256, (20, 20, 3), np.uint8))
    cells = np.empty((2, 1), object)
    cells[0, 0], cells[1, 0] = np.array(["1_0.jpg"]), np.array(["2_0.jpg"])
    scipy.io.savemat(root / "probe_img_ID_pairs.mat", {"probe_set": cells, "probe_ids": [[1], [2]]})
    cells = np.empty((2, 1), object)
    cells[0, 0], cells[1, 0] = np.array(["1_1.jpg"]), np.array(["2_1.jpg"])
    scipy.io.savemat(
        root / "gallery_match_img_ID_pairs.mat", {"gallery_set": cells, "gallery_ids": [[1], [2]]}
    )


@pytest.mark.slow
def test_run_evaluations_every_format(tiny_model, tmp_path, capsys):
    config, model, variables = tiny_model
    config = config.copy_and_resolve_references()
    (tmp_path / "bins").mkdir()
    # The held-out synthetic pairs written as a lossless .bin must score exactly like the
    # in-memory pairs: same pixels, same batches, same protocol.
    bin_lib.write_synthetic_bin(str(tmp_path / "bins" / "heldout.bin"), 40, 48, config.seed)
    _tiny_ijb(tmp_path / "ijbc")
    _tiny_tinyface(tmp_path / "tinyface")
    config.eval.update(
        bin_dir=str(tmp_path / "bins"),
        bin_sets="heldout,lfw",
        low_resolution_sides="both,probe",
        ijbc_dir=str(tmp_path / "ijbc"),
        tinyface_dir=str(tmp_path / "tinyface"),
    )
    suite.check_eval_config(config)
    writer = RecordingWriter()
    results = suite.run_evaluations(model, variables, config, str(tmp_path), 7, writer)

    out = capsys.readouterr().out
    assert "lfw.bin is not in" in out  # missing set: a note, no error
    # One progress line per set (stdout is not a terminal here: the final line only).
    for label in (
        "synthetic",
        "synthetic resolution sweep",
        "heldout",
        "ijbc",
        "tinyface",
        "synthetic_tinyface",
    ):
        assert re.search(rf"^embed {label}: (\d+)/\1 images in \d+m\d\ds", out, re.M), label
    assert set(results) == {
        "synthetic",
        "synthetic@8px",
        "synthetic@48px",
        "synthetic@probe8px",
        "synthetic@probe48px",
        "heldout",
        "ijbc",
        "tinyface",
        "synthetic_tinyface",
    }
    assert set(results["synthetic_tinyface"]) == {"rank1", "rank5", "rank10", "hr_rank1"}
    assert results["heldout"] == results["synthetic"]
    unchanged = {k: v for k, v in results["synthetic"].items() if k != "erc_auc"}
    assert results["synthetic@48px"] == unchanged  # 48 px = the input size: no degradation
    assert set(results["ijbc"]) == {f"tar@far=1e-{k}" for k in range(6, 0, -1)}
    assert set(results["tinyface"]) == {"rank1", "rank5", "rank20"}
    # 2 probes, 5 gallery images: rank 5 and rank 20 see the whole gallery.
    assert results["tinyface"]["rank5"] == results["tinyface"]["rank20"] == 1.0

    saved = json.load(open(tmp_path / "eval" / "results.json"))
    assert saved["step"] == 7 and saved["heldout"] == pytest.approx(results["heldout"])
    for picture in ("roc", "accuracy_vs_resolution", "error_vs_reject", "routing_map"):
        assert (tmp_path / "eval" / f"{picture}.png").stat().st_size > 1000
        image = writer.images[f"eval/{picture}"]
        assert image.ndim == 4 and image.shape[-1] == 3 and image.dtype == np.uint8
    routing = json.load(open(tmp_path / "eval" / "routing.json"))
    layer = routing["layers"]["blocks_0/moe/router"]
    assert np.array(layer["first_choice_expert"]).shape == (6, 6) and routing["faces"] == 16
    assert writer.scalars["eval/heldout/accuracy"] == results["heldout"]["accuracy"]
    assert "eval/routing/blocks_1/moe/router/positional_purity" in writer.scalars


def test_config_checks_and_periodic_steps(tiny_model, tmp_path):
    config = tiny_model[0].copy_and_resolve_references()
    suite.check_eval_config(config)
    config.eval.ijbc_dir = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"config.eval.ijbc_dir=.*nope.*not a directory"):
        suite.check_eval_config(config)
    config.eval.ijbc_dir = ""
    config.eval.bin_dir = str(tmp_path / "nobins")
    with pytest.raises(ValueError, match=r"config.eval.bin_dir=.*nobins.*not a directory"):
        suite.check_eval_config(config)
    config.eval.bin_dir = ""
    for identities, per_identity in ((1, 8), (-2, 8), (5, 1)):
        config.eval.quality_identities = identities
        config.eval.quality_images_per_identity = per_identity
        with pytest.raises(ValueError, match=f"config.eval.quality_identities={identities} "):
            suite.check_eval_config(config)
    config.eval.quality_identities, config.eval.quality_images_per_identity = 0, 8
    config.eval.every_steps = 3
    steps = [s for s in range(1, 11) if suite.is_periodic_eval_step(config, s, 9)]
    assert steps == [3, 6]  # step 9 is the final evaluation's


def test_a_quality_head_gets_the_identity_pair_set(tmp_path, capsys):
    """With a quality head and config.eval.quality_identities: `synthetic_quality` in
    results.json (every genuine pair of 3 identities x 3 images and as many impostors), its
    printed lines with the bootstrap interval, and its curves in the ERC picture's data."""
    import jax
    import jax.numpy as jnp

    from facemoe_jax.models import build_model
    from tests.conftest import tiny_config

    config = tiny_config()
    config.model.update(quality_head=True)
    config.eval.update(
        synthetic_pairs=20,
        low_resolution_sets="",
        quality_identities=3,
        quality_images_per_identity=3,
        quality_resolution_faces=4,
        routing_map_faces=0,
        quality_fmr=0.1,
    )
    model = build_model(config.model)
    variables = jax.jit(lambda r, x: model.init(r, x, train=False))(
        jax.random.PRNGKey(0), jnp.zeros((2, 48, 48, 3))
    )
    results = suite.run_evaluations(
        model, dict(variables), config, str(tmp_path), 3, RecordingWriter()
    )
    quality_set = results[suite.QUALITY_SET]
    assert quality_set["pairs"] == 2 * 3 * 3
    for prefix in ("", "mixed_"):
        low = quality_set[f"{prefix}fnmr_reject20_quality_minus_norm_low"]
        assert low <= quality_set[f"{prefix}fnmr_reject20_quality_minus_norm_high"]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved[suite.QUALITY_SET]["pairs"] == 18
    out = capsys.readouterr().out
    assert re.search(r"quality +18 pairs: FNMR .*head - norm 95 % interval \[", out)
    assert re.search(r"quality 18 pairs mixed-res: FNMR ", out)
