"""MXNet RecordIO (`train.rec` + `train.idx`), read and written without MXNet.

The byte format (see ``shared/spec/formats.md``): a record is ``uint32 magic 0xced7230a``,
``uint32 lrec`` (upper 3 bits ``cflag``, lower 29 bits the payload length), the payload, and
zero padding to a multiple of 4 bytes. ``cflag`` 0 is a whole payload; 1/2/3 are the first,
middle and last parts of a payload that was split where it contained the magic number, and the
reader re-inserts the magic between the parts. A payload is a 24-byte header ``<IfQQ`` (flag,
label, id, id2), then ``flag`` float32 label values when ``flag > 0``, then the encoded image.
The ``.idx`` file maps record keys to byte offsets, one ``key<TAB>offset`` per line.

insightface packs put a meta record at key 0 (``flag > 0``, label ``(a, b)``): images are keys
``1 .. a-1`` and keys ``a .. b-1`` are per-identity records with no image. Without a meta
record every key is an image. A meta count is float32, exact only below 2**24 (WebFace42M's
42,474,558 is stored as 42,474,560), so for large packs the image range is located from the
records themselves (the first identity record has no image).

Reading uses ``os.pread`` on a file descriptor opened lazily in each process: a source pickled
into grain worker processes carries only paths and the index, never an open file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_FLOAT32_EXACT = 1 << 24  # integers above this may be rounded in a float32 meta record


class BadRecordError(ValueError):
    """A record that cannot be read or decoded; the message names the file and key.

    The training pipeline skips (and counts) records raising this; anything else is a bug.
    """


def pack_payload(label, image: bytes, record_id: int = 0, id2: int = 0) -> bytes:
    """Header + optional label vector + image bytes, as insightface's ``pack`` writes them.

    A scalar ``label`` is stored in the header (``flag`` 0); a sequence of floats becomes the
    label vector (``flag`` = its length).
    """
    if np.ndim(label) == 0:
        return _HEADER.pack(0, float(label), record_id, id2) + image
    values = np.asarray(label, "<f4").ravel()
    return _HEADER.pack(len(values), 0.0, record_id, id2) + values.tobytes() + image


def unpack_payload(payload: bytes) -> tuple[int, float | np.ndarray, bytes]:
    """(flag, label, image bytes); the label is a float or, when ``flag > 0``, a float32 vector.

    Raises:
      ValueError: if the payload is shorter than its header says.
    """
    if len(payload) < _HEADER.size:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than the 24-byte header")
    flag, label, _, _ = _HEADER.unpack_from(payload)
    start = _HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise ValueError(
                f"header says {flag} label values but the payload has {len(payload)} bytes"
            )
        label = np.frombuffer(payload, "<f4", count=flag, offset=start).copy()
        start = end
    return flag, label, payload[start:]


def class_id(label) -> int:
    """An image's class: the scalar label, or the first value of a label vector."""
    return int(label if np.ndim(label) == 0 else label[0])


def encode_record(payload: bytes, cflag: int = 0) -> bytes:
    """One physical record: magic, lrec, payload, zero padding to 4 bytes."""
    if len(payload) > _MAX_LENGTH:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the 29-bit length field")
    padding = -len(payload) % 4
    return (
        struct.pack("<II", MAGIC, (cflag << _LENGTH_BITS) | len(payload))
        + payload
        + (b"\0" * padding)
    )


def write_recordio(rec_path: str, payloads: Iterable[tuple[int, bytes]]) -> int:
    """Writes (key, payload) pairs to ``rec_path`` and its ``.idx``; returns the record count.

    Payloads are written whole (``cflag`` 0), as insightface's packer does for image data; the
    reader also accepts split records.
    """
    idx_path = os.path.splitext(rec_path)[0] + ".idx"
    count = 0
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        for key, payload in payloads:
            idx.write(f"{int(key)}\t{rec.tell()}\n")
            rec.write(encode_record(payload))
            count += 1
    return count


def write_image_pack(
    rec_path: str, images: Iterable[bytes], labels: Iterable[int], *, meta: bool = True
) -> int:
    """An insightface-style pack: meta record 0, images 1..N, one record per identity.

    ``labels`` must be grouped (all images of a class contiguous) and numbered ``0 .. C-1`` in
    order, as the identity records describe key ranges. Returns the number of images.
    """
    images, labels = list(images), [int(x) for x in labels]
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    num_images = len(images)
    starts = [k for k in range(num_images) if k == 0 or labels[k] != labels[k - 1]]
    if [labels[k] for k in starts] != list(range(len(starts))):
        raise ValueError("labels must be grouped by class and numbered 0, 1, 2, ... in order")

    def records():
        num_classes = len(starts)
        if meta:
            first_identity = num_images + 1
            yield 0, pack_payload([first_identity, first_identity + num_classes], b"", 0, 1)
        for k, (image, label) in enumerate(zip(images, labels)):
            yield k + meta, pack_payload(label, image, k + meta)
        if meta:
            ends = starts[1:] + [num_images]
            for c, (start, end) in enumerate(zip(starts, ends)):
                yield num_images + 1 + c, pack_payload([start + 1, end + 1], b"", 0, 0)

    write_recordio(rec_path, records())
    return num_images


def _resolve_paths(path: str) -> tuple[str, str]:
    rec_path = path if path.endswith(".rec") else os.path.join(path, "train.rec")
    idx_path = rec_path[: -len(".rec")] + ".idx"
    for p in (rec_path, idx_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"RecordIO file {p} does not exist")
    return rec_path, idx_path


def _read_index(idx_path: str, rec_size: int) -> dict[int, int]:
    offsets = {}
    with open(idx_path) as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                raise ValueError(
                    f"{idx_path}:{line_number}: expected 'key<TAB>offset', got {line.strip()!r}"
                ) from None
            if not 0 <= offset < rec_size:
                raise ValueError(
                    f"{idx_path}:{line_number}: offset {offset} of key {key} is outside the "
                    f".rec file ({rec_size} bytes): is the .idx from another .rec?"
                )
            offsets[key] = offset
    if not offsets:
        raise ValueError(f"{idx_path} lists no records")
    return offsets


class RecordIODataSource:
    """Random-access source over an insightface RecordIO pack (a grain data source).

    ``path`` is the folder holding ``train.rec``/``train.idx`` or a ``.rec`` path (its ``.idx``
    beside it). Record ``i`` is ``{"image": encoded bytes, "label": int, "key": str}``; the
    pipeline decodes the image. ``num_images`` and ``num_classes`` come from the meta record
    when there is one, else from the index and a scan of the label headers.
    """

    def __init__(self, path: str):
        self.rec_path, self.idx_path = _resolve_paths(path)
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._rec_size = os.path.getsize(self.rec_path)
        self._offsets = _read_index(self.idx_path, self._rec_size)
        self._num_classes: int | None = None
        first_key = min(self._offsets)
        flag, label, image = unpack_payload(self._read_payload(first_key))
        if first_key == 0 and flag > 0 and not image:  # insightface meta record
            image_end = int(label[0])
            if image_end >= _FLOAT32_EXACT:
                image_end = self._exact_image_end(image_end)
            self._keys = np.array(sorted(k for k in self._offsets if 1 <= k < image_end), np.int64)
            if len(self._keys) != image_end - 1:
                raise ValueError(
                    f"{self.idx_path}: the meta record says images are keys 1..{image_end - 1} "
                    f"but the index lists {len(self._keys)} of them (short .idx?)"
                )
            self._num_classes = int(label[1]) - image_end if len(label) > 1 else None
            if self._num_classes is not None and int(label[1]) >= _FLOAT32_EXACT:
                self._num_classes = max(self._offsets) + 1 - image_end
        else:
            self._keys = np.array(sorted(self._offsets), np.int64)

    def _exact_image_end(self, rounded: int) -> int:
        """The first identity-record key near a float32-rounded meta count."""
        spacing = int(np.spacing(np.float32(rounded)))
        for key in range(rounded - spacing, rounded + spacing + 1):
            if key in self._offsets:
                flag, _, image = unpack_payload(self._read_payload(key))
                if flag > 0 and not image:
                    return key
        return rounded

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_fd_pid": None}

    def _file(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def _read_exact(self, offset: int, size: int, key: int) -> bytes:
        data = os.pread(self._file(), size, offset)
        if len(data) != size:
            raise BadRecordError(
                f"{self.rec_path} key {key}: truncated at byte {offset + len(data)} "
                f"(wanted {size} bytes at {offset})"
            )
        return data

    def _read_payload(self, key: int) -> bytes:
        """The payload of record ``key``, joining split (cflag 1/2/3) parts."""
        offset = self._offsets[key]
        parts = []
        while True:
            magic, lrec = struct.unpack("<II", self._read_exact(offset, 8, key))
            if magic != MAGIC:
                raise BadRecordError(
                    f"{self.rec_path} key {key}: bad magic {magic:#010x} at byte {offset}"
                )
            cflag, length = lrec >> _LENGTH_BITS, lrec & _MAX_LENGTH
            parts.append(self._read_exact(offset + 8, length, key))
            offset += 8 + length + (-length % 4)
            if cflag in (0, 3):
                break
            if cflag not in (1, 2) or (cflag == 2 and len(parts) == 1):
                raise BadRecordError(f"{self.rec_path} key {key}: unexpected cflag {cflag}")
        if len(parts) > 1 and cflag != 3:
            raise BadRecordError(f"{self.rec_path} key {key}: split record without its last part")
        return _MAGIC_BYTES.join(parts)

    @property
    def num_images(self) -> int:
        return len(self._keys)

    @property
    def num_classes(self) -> int:
        """From the meta record, or max label + 1 over a scan of every header (then cached)."""
        if self._num_classes is None:
            largest = -1
            for key in self._keys:
                largest = max(largest, self.label_of(int(key)))
            self._num_classes = largest + 1
        return self._num_classes

    def label_of(self, key: int) -> int:
        """The class id of record ``key``, reading only its header."""
        offset = self._offsets[key]
        flag, label, _, _ = _HEADER.unpack(self._read_exact(offset + 8, _HEADER.size, key))
        if flag > 0:
            (label,) = struct.unpack("<f", self._read_exact(offset + 8 + _HEADER.size, 4, key))
        return int(label)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> dict:
        key = int(self._keys[index])
        try:
            _, label, image = unpack_payload(self._read_payload(key))
        except BadRecordError:
            raise
        except ValueError as e:
            raise BadRecordError(f"{self.rec_path} key {key}: {e}") from None
        return {"image": image, "label": class_id(label), "key": f"{self.rec_path} key {key}"}

    def __repr__(self) -> str:
        return f"RecordIODataSource({self.rec_path!r}, num_images={len(self)})"
