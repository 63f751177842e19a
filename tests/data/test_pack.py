"""The pack command: undecodable images skipped and listed (or fatal), progress, clear errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from facemoe_jax.data import bin_file, lfw_pairs, pack, recordio
from facemoe_jax.evaluate import bin as bin_lib
from facemoe_jax.evaluate import lfw, verification
from tests.data.test_recordio import jpeg
from tests.evaluate.test_lfw import make_fake_lfw, random_sets, toy_embed, write_pairs_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def image_tree(root, bad: dict[str, bytes]):
    """alice: 2 good; bob: 1 good + bad ones; carol: only bad ones (when given)."""
    for name, values in {"alice": [1, 2], "bob": [3], "carol": []}.items():
        (root / name).mkdir(parents=True)
        for k, value in enumerate(values):
            (root / name / f"{k}.jpg").write_bytes(jpeg(value))
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    return root


def test_undecodable_images_are_listed_and_skipped(tmp_path, capsys):
    truncated = jpeg(7)[:-40]
    images = image_tree(
        tmp_path / "images",
        {"bob/9.jpg": truncated, "bob/a.png": b"not an image", "carol/0.jpg": b""},
    )
    pack.main(["--images", str(images), "--out", str(tmp_path / "rec"), "--workers", "2"])
    out = capsys.readouterr().out
    assert "skipped 3 undecodable images" in out
    for rel in ("bob/9.jpg", "bob/a.png", "carol/0.jpg"):
        assert f"skipped {images / rel}: " in out, rel
    assert "dropped 1 identities with no decodable image: carol" in out
    assert "num_images=3 num_classes=2" in out
    assert "pack: read and check: 6/6 images in" in out  # the progress line (not a terminal)
    listed = (tmp_path / "rec" / pack.SKIPPED_FILE).read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [
        str(images / rel) for rel in ("bob/9.jpg", "bob/a.png", "carol/0.jpg")
    ]
    source = recordio.RecordIODataSource(str(tmp_path / "rec"))
    assert [source[k]["label"] for k in range(3)] == [0, 0, 1] and source.num_classes == 2
    assert source[2]["image"] == (images / "bob" / "0.jpg").read_bytes()


def test_fail_on_bad_images_stops_with_one_error_line(tmp_path, capsys):
    images = image_tree(tmp_path / "images", {"bob/9.jpg": b"garbage", "carol/0.jpg": jpeg(5)})
    argv = ["--images", str(images), "--out", str(tmp_path / "rec"), "--fail-on-bad-images"]
    with pytest.raises(SystemExit) as exit_info:
        pack.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: undecodable image ")
    assert str(images / "bob" / "9.jpg") in err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "/nonexistent"], "error: image folder /nonexistent does not exist"),
        (
            ["--recordio", "/nonexistent", "--to-array-record"],
            "error: RecordIO file /nonexistent/train.rec does not exist",
        ),
    ],
)
def test_missing_input_ends_in_one_error_line_and_no_traceback(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "facemoe_jax.data.pack", *args, "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert "Traceback" not in result.stdout + result.stderr


def test_pairs_bin_evaluates_like_the_folder_protocol(tmp_path, capsys):
    # A View 2 file of 10 sets: the .bin protocol's 10 contiguous folds are the file's sets, so
    # the .bin path (load_bin, 10 contiguous folds) and the folder protocol with the .bin sets'
    # threshold grid give the same numbers.
    names = make_fake_lfw(tmp_path, people=5, images_per_person=3, size=32)
    write_pairs_file(tmp_path / "pairs.txt", random_sets(names, 10, 2, images_per_person=3))
    pairs, issame, folds = lfw_pairs.read_pairs(str(tmp_path / "pairs.txt"))
    for f, idx in enumerate(verification.contiguous_folds(len(pairs), 10)):
        assert (folds[idx] == f).all()
    out = tmp_path / "out" / "lfw.bin"
    pack.main(
        [
            "--pairs",
            "pairs.txt",
            "--images",
            str(tmp_path / lfw_pairs.ALIGNED_FOLDER),
            "--out",
            str(out),
        ]
    )
    assert "wrote" in capsys.readouterr().out
    bins, bin_same = bin_file.read_bin_raw(str(out))
    aligned = tmp_path / lfw_pairs.ALIGNED_FOLDER
    assert bins == [(aligned / p).read_bytes() for pair in pairs for p in pair]  # bytes as is
    np.testing.assert_array_equal(bin_same, issame)

    images_a, images_b, _ = bin_lib.load_bin(str(out), 32)
    from_bin = verification.verification_metrics(
        toy_embed(images_a, False), toy_embed(images_b, False), bin_same
    )
    folder = lfw.evaluate_lfw(
        toy_embed, str(tmp_path), "pairs.txt", (32,), model_size=32, thresholds="grid"
    )
    row = folder["rows"]["lfw_view2@32px"]
    for key in ("accuracy", "accuracy_std", "best_threshold", "tar@far=1e-3"):
        assert row[key] == pytest.approx(from_bin[key], abs=1e-12), key


def test_pairs_bin_errors_are_one_line(tmp_path, capsys):
    names = make_fake_lfw(tmp_path, people=2, images_per_person=2, size=16)
    write_pairs_file(tmp_path / "pairs.txt", [([(names[0], 1, 3)], [(names[0], 1, names[1], 1)])])
    with pytest.raises(SystemExit) as done:
        pack.main(["--pairs", "pairs.txt", "--images", str(tmp_path), "--out", "x.bin"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: image ") and "P0_0003.jpg" in lines[0]
