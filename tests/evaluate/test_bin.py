"""insightface .bin verification sets: Python-2 pickles, numpy entries, refusal of code."""

import os
import pickle
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest

from facemoe_jax.data import bin_file, synthetic
from facemoe_jax.evaluate import bin as bin_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """The opcodes Python 2's cPickle (protocol 2) writes for (list of str, list of bool).

    A Python 2 `str` is a byte string: BINSTRING ('T', 4-byte length), which Python 3 reads as
    bytes with encoding='bytes'. Memo opcodes are left out (they change nothing here).
    """
    out = [b"\x80\x02", b"]", b"("]
    for data in bins:
        out.append(b"T" + struct.pack("<I", len(data)) + data)
    out += [b"e", b"]", b"("]
    out += [b"\x88" if same else b"\x89" for same in issame]
    out += [b"e", b"\x86", b"."]
    return b"".join(out)


def _random_faces(n, size=24, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth images so JPEG keeps them recognisable; exactness is checked against cv2 itself.
    small = rng.integers(0, 256, (n, 6, 6, 3), np.uint8)
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in small])


def test_python2_jpeg_pickle_decodes_like_cv2(tmp_path):
    faces = _random_faces(6)
    jpegs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in faces]
    issame = [True, False, True]
    path = tmp_path / "lfw.bin"
    path.write_bytes(_python2_pickle(jpegs, issame))

    images_a, images_b, same = bin_lib.load_bin(str(path))
    expected = [
        cv2.cvtColor(cv2.imdecode(np.frombuffer(j, np.uint8), 1), cv2.COLOR_BGR2RGB) for j in jpegs
    ]
    np.testing.assert_array_equal(images_a, np.stack(expected[0::2]))
    np.testing.assert_array_equal(images_b, np.stack(expected[1::2]))
    np.testing.assert_array_equal(same, issame)
    assert np.abs(images_a.astype(int) - faces[0::2]).mean() < 8  # JPEG is close, not exact


def test_numpy_array_entries_and_resize(tmp_path):
    faces = _random_faces(4, size=32)
    pngs = [np.frombuffer(bin_lib.encode_image(f), np.uint8) for f in faces]
    path = tmp_path / "cfp_fp.bin"
    with open(path, "wb") as f:
        pickle.dump((pngs, np.array([False, True])), f, protocol=2)
    images_a, images_b, issame = bin_lib.load_bin(str(path))
    np.testing.assert_array_equal(images_a, faces[0::2])  # PNG: lossless
    np.testing.assert_array_equal(images_b, faces[1::2])
    np.testing.assert_array_equal(issame, [False, True])
    small_a, _, _ = bin_lib.load_bin(str(path), image_size=16)
    # mx.image.resize_short's bicubic (OpenCV INTER_CUBIC) shrinks too.
    expected = cv2.resize(faces[0], (16, 16), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(small_a[0], expected)


def test_resize_matches_the_official_hq_script(tmp_path):
    # FaceMoE validation_hq/validate_hq.py (and insightface's eval/verification.py), as facts:
    # mx.image.imdecode (OpenCV decode, RGB out); when the width is not the input size,
    # mx.image.resize_short(img, 120) with its default interp=2 = OpenCV bicubic, so a 112x112
    # face becomes 120x120; then torch.flip over the width for the mirror embedding and
    # (x/255 - 0.5)/0.5 (the embedder's job, tested in test_tinyface.py).
    rng = np.random.default_rng(5)
    noise = [
        cv2.GaussianBlur(rng.uniform(0, 255, (112, 112, 3)).astype(np.float32), (0, 0), 1.2)
        for _ in range(4)
    ]
    faces = np.clip((np.stack(noise) - 127.5) * 4 + 128, 0, 255).astype(np.uint8)
    jpegs = [bin_lib.encode_image(f, ".jpg") for f in faces]
    path = tmp_path / "lfw.bin"
    path.write_bytes(_python2_pickle(jpegs, [True, False]))
    images_a, images_b, _ = bin_lib.load_bin(str(path), image_size=120)
    got = np.stack([images_a[0], images_b[0], images_a[1], images_b[1]])
    decoded = [
        cv2.cvtColor(cv2.imdecode(np.frombuffer(j, np.uint8), 1), cv2.COLOR_BGR2RGB) for j in jpegs
    ]
    expected = np.stack([cv2.resize(d, (120, 120), interpolation=cv2.INTER_CUBIC) for d in decoded])
    assert int(np.abs(got.astype(int) - expected).max()) == 0
    bilinear = np.stack(
        [cv2.resize(d, (120, 120), interpolation=cv2.INTER_LINEAR) for d in decoded]
    )
    assert np.abs(bilinear.astype(int) - expected).mean() > 1.0  # the old filter: measured 4.8


def test_write_synthetic_creates_the_parent_folder(tmp_path):
    out = tmp_path / "runs" / "bins" / "heldout.bin"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "facemoe_jax.evaluate.bin",
            "--write-synthetic",
            str(out),
            "--pairs",
            "4",
            "--image-size",
            "16",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    images_a, _, issame = bin_lib.load_bin(str(out))
    assert images_a.shape == (4, 16, 16, 3) and len(issame) == 4


def test_write_bin_round_trip_is_exact(tmp_path):
    a, b, issame = synthetic.verification_pairs(num_pairs=6, image_size=24, seed=3)
    path = str(tmp_path / "synthetic.bin")
    bin_lib.write_bin(path, a, b, issame)
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x02"  # protocol 2, like the public files
    got_a, got_b, got_same = bin_lib.load_bin(path)
    np.testing.assert_array_equal(got_a, a)
    np.testing.assert_array_equal(got_b, b)
    np.testing.assert_array_equal(got_same, issame)


def test_write_bin_raw_keeps_the_bytes(tmp_path):
    bins = [bin_lib.encode_image(np.full((8, 8, 3), v, np.uint8), ".jpg") for v in (10, 200)]
    path = str(tmp_path / "sub" / "raw.bin")
    bin_file.write_bin_raw(path, bins, [True])
    got, issame = bin_file.read_bin_raw(path)
    assert got == bins and issame.tolist() == [True]
    with pytest.raises(ValueError, match="3 images for 2 pairs"):
        bin_file.write_bin_raw(path, bins + bins[:1], [True, False])


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([exploit, b"x"], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"evil.bin: refusing to load (posix|os)\.system"):
        bin_lib.load_bin(str(path))
    assert not marker.exists()

    # Abusing the one allowed helper (bytes re-encoding) with another codec is refused too.
    payload = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="latin1"):
        bin_lib.load_bin(str(path))


def test_bad_files_name_the_problem(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"odd.bin: 3 images for 1 pairs"):
        bin_lib.load_bin(str(path))
    path.write_bytes(pickle.dumps(([b"not an image", b"x"], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"odd.bin: bins\[0\] is not a decodable"):
        bin_lib.load_bin(str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="odd.bin"):
        bin_lib.load_bin(str(path))


def test_list_bin_sets(tmp_path):
    (tmp_path / "lfw.bin").write_bytes(b"")
    (tmp_path / "agedb_30.bin").write_bytes(b"")
    assert bin_lib.list_bin_sets(str(tmp_path), "") == [
        ("agedb_30", str(tmp_path / "agedb_30.bin")),
        ("lfw", str(tmp_path / "lfw.bin")),
    ]
    assert bin_lib.list_bin_sets(str(tmp_path), "lfw, cfp_fp") == [
        ("lfw", str(tmp_path / "lfw.bin")),
        ("cfp_fp", None),
    ]
    with pytest.raises(ValueError, match="bin_dir=.*nowhere.*not a directory"):
        bin_lib.list_bin_sets(str(tmp_path / "nowhere"), "")
