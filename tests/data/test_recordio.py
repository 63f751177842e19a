"""RecordIO: byte format built by hand, writer/reader round trip, meta record, splits, errors."""

import os
import struct

import cv2
import numpy as np
import pytest

from facemoe_jax.data import pack, recordio, tfds_sources

MAGIC = struct.pack("<I", 0xCED7230A)


def jpeg(value: int, size: int = 16) -> bytes:
    image = np.full((size, size, 3), value, np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def header(flag: int, label: float, id1: int = 0, id2: int = 0) -> bytes:
    return struct.pack("<IfQQ", flag, label, id1, id2)


def physical(payload: bytes, cflag: int = 0) -> bytes:
    """One record by the spec: magic, lrec (cflag in the top 3 bits), payload, pad to 4."""
    lrec = (cflag << 29) | len(payload)
    return MAGIC + struct.pack("<I", lrec) + payload + b"\0" * (-len(payload) % 4)


def write_raw(directory, records: list[tuple[int, bytes]]) -> str:
    """Writes physical records (already encoded) and an .idx of their offsets."""
    rec_path = os.path.join(directory, "train.rec")
    with open(rec_path, "wb") as rec, open(os.path.join(directory, "train.idx"), "w") as idx:
        for key, data in records:
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(data)
    return rec_path


def test_writer_bytes_match_the_spec():
    payload = recordio.pack_payload(3, b"abcde", record_id=7)
    assert payload == header(0, 3.0, 7) + b"abcde"
    vector = recordio.pack_payload([2.0, 5.0], b"x")
    assert vector == header(2, 0.0) + np.array([2, 5], "<f4").tobytes() + b"x"
    assert recordio.encode_record(payload) == physical(payload)
    assert len(recordio.encode_record(payload)) % 4 == 0


def test_round_trip_with_meta_record_and_identity_records(tmp_path):
    images = [jpeg(10 * k) for k in range(5)]
    labels = [0, 0, 1, 1, 1]
    rec_path = str(tmp_path / "train.rec")
    assert recordio.write_image_pack(rec_path, images, labels) == 5
    source = recordio.RecordIODataSource(str(tmp_path))  # the folder form
    assert len(source) == source.num_images == 5 and source.num_classes == 2
    for k in range(5):
        record = source[k]
        assert record["image"] == images[k] and record["label"] == labels[k]
        assert record["key"].endswith(f"key {k + 1}")  # images are keys 1..N
    # The meta record and identity records are what insightface writes.
    raw = source._read_payload(0)
    flag, label, image = recordio.unpack_payload(raw)
    assert flag == 2 and list(label) == [6, 8] and image == b""
    _, identity_range, _ = recordio.unpack_payload(source._read_payload(7))
    assert list(identity_range) == [3, 6]  # class 1 holds keys 3, 4, 5


def test_hand_built_pack_with_vector_labels_and_a_split_record(tmp_path):
    image_a, image_b = jpeg(50), jpeg(200)
    # Image 2's payload contains the magic number, so it is stored in three parts
    # (cflag 1, 2, 3) with the magic removed at each split point.
    split_image = b"AB" + MAGIC + b"CDEFG" + MAGIC + b"HI"
    payload_2 = header(0, 1.0) + split_image
    parts = payload_2.split(MAGIC)
    assert len(parts) == 3
    split_records = physical(parts[0], 1) + physical(parts[1], 2) + physical(parts[2], 3)
    meta = header(2, 0.0, 0, 1) + np.array([4, 6], "<f4").tobytes()
    records = [
        (0, physical(meta)),
        (1, physical(header(2, 0.0) + np.array([0, 7.5], "<f4").tobytes() + image_a)),
        (2, split_records),
        (3, physical(header(0, 1.0) + image_b)),
        (4, physical(header(2, 0.0) + np.array([1, 2], "<f4").tobytes())),
        (5, physical(header(2, 0.0) + np.array([2, 4], "<f4").tobytes())),
    ]
    source = recordio.RecordIODataSource(write_raw(tmp_path, records))  # the .rec form
    assert len(source) == 3 and source.num_classes == 2
    assert source[0]["label"] == 0 and source[0]["image"] == image_a  # vector label: [0]
    assert source[1]["image"] == split_image and source[1]["label"] == 1
    assert source[2]["image"] == image_b and source[2]["label"] == 1


def test_pack_without_meta_record_scans_labels(tmp_path):
    recordio.write_image_pack(str(tmp_path / "x.rec"), [jpeg(1)] * 4, [0, 1, 2, 2], meta=False)
    source = recordio.RecordIODataSource(str(tmp_path / "x.rec"))
    assert len(source) == 4 and source.num_classes == 3
    assert [source[k]["label"] for k in range(4)] == [0, 1, 2, 2]


def test_missing_and_short_index_give_clear_errors(tmp_path):
    recordio.write_image_pack(str(tmp_path / "train.rec"), [jpeg(1)] * 3, [0, 0, 1])
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:2]) + "\n")  # meta + one image of three
    with pytest.raises(ValueError, match=r"images are keys 1..3 but the index lists 1"):
        recordio.RecordIODataSource(str(tmp_path))
    idx.write_text("0\t99999\n")
    with pytest.raises(ValueError, match="outside the .rec file"):
        recordio.RecordIODataSource(str(tmp_path))
    idx.unlink()
    with pytest.raises(FileNotFoundError, match="train.idx does not exist"):
        recordio.RecordIODataSource(str(tmp_path))


def test_bad_header_and_truncation_raise_bad_record_error(tmp_path):
    good = physical(header(0, 0.0) + jpeg(5))
    rec_path = write_raw(tmp_path, [(0, good), (1, b"\0" * 8 + good), (2, good)])
    with open(rec_path, "r+b") as f:  # truncate the last record's payload
        f.truncate(os.path.getsize(rec_path) - 20)
    source = recordio.RecordIODataSource(rec_path)
    assert source[0]["label"] == 0
    with pytest.raises(recordio.BadRecordError, match="key 1: bad magic"):
        source[1]
    with pytest.raises(recordio.BadRecordError, match="key 2: truncated"):
        source[2]


def test_pack_command_folder_to_recordio_to_array_record(tmp_path, capsys):
    images = tmp_path / "images"
    for name, values in {"bob": [1, 2], "alice": [3], "carol": [4, 5, 6]}.items():
        (images / name).mkdir(parents=True)
        for k, value in enumerate(values):
            (images / name / f"{k}.jpg").write_bytes(jpeg(value))
        (images / name / "notes.txt").write_text("ignored")
    pack.main(["--images", str(images), "--out", str(tmp_path / "rec")])
    assert "num_images=6 num_classes=3" in capsys.readouterr().out
    source = recordio.RecordIODataSource(str(tmp_path / "rec"))
    # Sorted folder names: alice=0, bob=1, carol=2.
    assert [source[k]["label"] for k in range(6)] == [0, 1, 1, 2, 2, 2]
    assert source[0]["image"] == (images / "alice" / "0.jpg").read_bytes()

    pack.main(
        ["--recordio", str(tmp_path / "rec"), "--out", str(tmp_path / "ar"), "--to-array-record"]
    )
    array_source = tfds_sources.ArrayRecordSource(str(tmp_path / "ar"))
    assert len(array_source) == 6 and array_source.num_classes == 3
    for k in range(6):
        assert array_source[k]["image"] == source[k]["image"]
        assert array_source[k]["label"] == source[k]["label"]
