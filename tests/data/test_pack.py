"""The pack command: undecodable images skipped and listed (or fatal), progress, clear errors."""

import os
import subprocess
import sys

import pytest

from facemoe_jax.data import pack, recordio
from tests.data.test_recordio import jpeg

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
