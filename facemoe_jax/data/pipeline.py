"""Grain input pipeline: shuffled, sharded, augmented, batched records, and evaluation batches.

Training reads a random-access source (``{"image": uint8 HWC or encoded bytes, "label": int,
optionally "key": str}`` records: ``synthetic.SyntheticFaces``, ``recordio.RecordIODataSource``,
``folder.ImageFolderSource``, ``tfds_sources``) through one grain ``MapDataset`` chain:

    source -> shuffle -> repeat forever -> decode + resize -> replace bad records
           -> random_map(augment) -> host shard -> batch
           -> to_iter_dataset (thread prefetch) [-> mp_prefetch (worker processes)]
           -> TrainIterator (counts and reports skipped records, in the main process)

The first five steps are one node, ``_TrainRecords``, which gives exactly what grain's
``shuffle``, ``repeat``, ``map`` and ``random_map`` nodes would (the same ``index_shuffle``
permutations, the same per-element Philox streams; a test checks it) without their
per-record bookkeeping, which cost about as much as decoding a 112 px JPEG.

Determinism. Every random choice is a pure function of the seed and a position:
  - ``shuffle`` permutes each epoch with seed + epoch (grain folds the epoch of the index it
    is asked for into the seed), so epochs differ and are reproducible;
  - ``random_map`` seeds each element's generator from (augment seed, the element's position in
    the *global* shuffled stream); it runs before the host shard, so a record's augmentation
    depends neither on the number of hosts nor on the number of worker processes.
The iterator's ``get_state()`` is a small JSON-able dict (the next batch position, or with
worker processes each worker's position); ``set_state`` on a fresh iterator built with the same
arguments (worker_count included) resumes with exactly the same batches. With or without
workers the batches themselves are identical: grain's ``mp_prefetch`` gives worker ``w`` of
``k`` the batches ``w, w + k, ...`` and interleaves them back in order.

Sharding. Host ``h`` of ``n`` takes global stream positions ``h, h + n, h + 2n, ...`` and
batches them by ``b = global_batch_size // n``. So global batch ``j`` is stream positions
``j * B .. (j + 1) * B - 1``, spread over the hosts, disjoint between hosts, and the same
whatever ``n`` is.

Bad data. A record whose source read or decode raises ``recordio.BadRecordError`` (truncated
or corrupt image, bad RecordIO header, unreadable file) is replaced by the next good record of
the shuffled stream (position p + 1, p + 2, ...), which keeps its own label: labels never
change, the batch shape is static, and the replacement is as deterministic as everything else
(it sits before ``random_map`` and the shard). The replacing record carries the bad record's
key in a ``"skipped"`` field that the batch collects, so the count survives worker processes;
``TrainIterator`` in the main process adds it up (``skipped_records``, in the iterator state),
logs each bad key once, and raises ``BadDataError`` when more than ``max_bad_share`` of the
records read so far were bad (checked once ``min(1000, records per epoch)`` have been read).

Paired mode: an augment that returns ``{"image": LR, "image_hr": HR}`` (``augment.Augmenter``
with ``paired=True``) gives batches with both, for distillation.

Images stay uint8 all the way to the device: the jitted step normalises them with
``normalize_images``, so the host sends a quarter of the bytes float32 would need.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator

import cv2
import grain
import numpy as np

from facemoe_jax.data.recordio import BadRecordError

_log = logging.getLogger(__name__)

Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray | dict]

# The bad-record share is judged only after this many records (or an epoch, if smaller): one
# bad image in the first batch is not yet evidence of a broken data set.
_MIN_RECORDS_FOR_SHARE = 1000
# More consecutive bad records than this means the file, not a record, is broken.
_MAX_CONSECUTIVE_BAD = 64
# Name at most this many bad keys in the log; the count goes on.
_MAX_REPORTED_KEYS = 100


# OpenCV >= 4.10 decodes straight to RGB (libjpeg-turbo writes RGB; no BGR->RGB pass after).
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


class BadDataError(RuntimeError):
    """Too many records of the training data could not be read."""


def decode_image(data, key: str = "?") -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, BMP, WebP, TIFF, PNM, JPEG 2000) -> uint8 (H, W, 3) RGB.

    A decoded (H, W[, C]) RGB(A) or greyscale array of 8 or 16 bits is converted the same way
    (uint8 RGB arrays pass unchanged); ``decode_image_converting`` says what is converted, how.

    Raises:
      BadRecordError: naming ``key`` if the bytes are empty, truncated (a JPEG without its end
        marker, a PNG without its IEND chunk), not decodable or of an unsupported pixel type.
    """
    return decode_image_converting(data, key, describe=False)[0]


def decode_image_converting(data, key: str = "?", describe: bool = True):
    """(uint8 (H, W, 3) RGB image, the conversions it took: () for a file of 8-bit colour).

    Conversions, named in the tuple as the pre-check of image folders counts them:
      "greyscale"  one channel (or a greyscale JPEG) repeated into three;
      "CMYK"       a CMYK/YCCK JPEG, converted by the JPEG decoder;
      "alpha"      an alpha channel dropped: the stored colour is kept, as OpenCV's
                   ``IMREAD_COLOR`` (the decoder before these conversions) did, so packs
                   written before decode to the same pixels;
      "16-bit"     (or "maximum M" for a PNM whose largest value is M, not 255) scaled to 8
                   bits with rounding, ``round(v * 255 / max)``, not truncated to the high byte.
    JPEGs are oriented by their EXIF tag (OpenCV's ``IMREAD_COLOR`` applies it); other formats
    are decoded with ``IMREAD_UNCHANGED``, which ignores orientation tags. ``describe=False``
    skips reading the JPEG header (the training decode needs only the pixels).
    """
    decoded = isinstance(data, np.ndarray) and data.ndim in (2, 3)
    if decoded and data.dtype == np.uint8 and data.ndim == 3 and data.shape[2] == 3:
        return data, ()  # the common case first: synthetic and TFDS sources
    if decoded:
        try:
            return _converted(data, "rgb", None)
        except ValueError as e:
            raise BadRecordError(f"{key}: {e}") from None
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
    if buffer.size == 0:
        raise BadRecordError(f"{key}: empty image")
    head, tail = buffer[:8].tobytes(), buffer[-16:].tobytes().rstrip(b"\0")
    if head[:2] == b"\xff\xd8":
        if not tail.endswith(b"\xff\xd9"):
            raise BadRecordError(f"{key}: truncated JPEG (no end-of-image marker)")
        image = cv2.imdecode(buffer, _IMREAD_RGB or cv2.IMREAD_COLOR)
        if image is None:
            raise BadRecordError(f"{key}: not a decodable image ({buffer.size} bytes)")
        if not _IMREAD_RGB:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        components = _jpeg_components(buffer) if describe else 3
        return image, {1: ("greyscale",), 4: ("CMYK",)}.get(components, ())
    if head[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        raise BadRecordError(f"{key}: truncated PNG (no IEND chunk)")
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise BadRecordError(f"{key}: not a decodable image ({buffer.size} bytes)")
    try:
        return _converted(image, "bgr", _binary_pnm_maxval(head, buffer))
    except ValueError as e:
        raise BadRecordError(f"{key}: {e}") from None


def _converted(image: np.ndarray, order: str, maxval: int | None):
    """(uint8 RGB image, conversions) of a decoded array in channel `order` ("bgr" or "rgb").

    `maxval`: the largest value the array's depth stands for when it is not the dtype's own
    (a binary PNM says it in its header; OpenCV returns its samples unscaled)."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and maxval is None:
        return (image if order == "rgb" else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)), ()
    conversions = []
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{image.dtype} pixels are not supported (8 or 16 bits per sample)")
    if image.ndim == 3 and image.shape[2] in (2, 4):  # grey + alpha, colour + alpha
        image = image[..., : image.shape[2] - 1]
        conversions.append("alpha")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim != 2 and not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"image of shape {image.shape} is neither greyscale nor colour")
    full = maxval or np.iinfo(image.dtype).max
    if full != 255:
        conversions.append("16-bit" if full == 65535 else f"maximum {full}")
        wide = image.astype(np.uint32)  # v * 255 fits; exact integer rounding to nearest
        image = ((wide * 255 + full // 2) // full).astype(np.uint8)
    if image.ndim == 2:
        conversions.insert(0, "greyscale")
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), tuple(conversions)
    if order == "bgr":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image), tuple(conversions)


def _binary_pnm_maxval(head: bytes, buffer: np.ndarray) -> int | None:
    """The maximum sample value of a binary PGM/PPM (P5/P6) when it is not 255 or 65535.

    OpenCV returns binary PNM samples as stored (0 .. maxval) but scales ASCII ones (P2/P3)
    below 256 to 255 itself, so only the binary ones need the header's maxval.
    """
    if head[:2] not in (b"P5", b"P6"):
        return None
    header = buffer[:512].tobytes()
    fields = re.sub(rb"#[^\n]*", b" ", header[2:]).split()
    if len(fields) < 3 or not fields[2].isdigit():
        return None
    maxval = int(fields[2])
    return None if maxval in (255, 65535) or not 0 < maxval < 65536 else maxval


def _jpeg_components(buffer: np.ndarray) -> int:
    """Colour components of a JPEG (1 greyscale, 3 YCbCr/RGB, 4 CMYK/YCCK) from its frame
    header; 3 if the header cannot be found in the first 64 KiB."""
    data = buffer[:65536].tobytes()
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        # SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC): precision, height, width, components.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[position + 9] if position + 9 < len(data) else 3
        position += 2 + length
    return 3


class DecodeAndResize:
    """grain map: decode a record's image to RGB and resize it to (size, size) if needed.

    Shrinking uses area averaging (no aliasing), enlarging bilinear (the official training
    resize). ``size=None`` keeps the source's size.
    """

    def __init__(self, size: int | None):
        self.size = size

    def __call__(self, record: dict) -> dict:
        image = decode_image(record["image"], record.get("key", "?"))
        if self.size is not None and image.shape[:2] != (self.size, self.size):
            shrink = image.shape[0] > self.size or image.shape[1] > self.size
            interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            image = cv2.resize(image, (self.size, self.size), interpolation=interpolation)
        return {**record, "image": image}


class _AugmentImage:
    """Applies ``augment(image, rng)`` to a record's image (in place: records are fresh dicts).

    A named class rather than a lambda so that the pipeline's repr names it. An augment
    returning a dict (paired mode) sets those fields instead of ``"image"``.
    """

    def __init__(self, augment: Augment):
        self.augment = augment

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        out = self.augment(record["image"], rng)
        if isinstance(out, dict):
            record.update(out)
        else:
            record["image"] = out
        return record


class _RngPool:
    """Per-element generators, the same streams as grain's ``random_map`` gives.

    grain seeds element ``i`` of ``random_map(fn, seed=s)`` with
    ``Generator(Philox(s))`` whose counter is set to ``[0, 0, 0, i]`` (fresh buffer). This
    pool does the same with the Philox key computed once and generators reused, so one element
    costs a state assignment (~3 us) instead of a state round trip (~7 us).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._key = np.random.Philox(seed).state["state"]["key"]
        self._free: list[np.random.Generator] = []
        self._lock = threading.Lock()

    def __reduce__(self):
        return _RngPool, (self.seed,)

    def acquire(self, index: int) -> np.random.Generator:
        with self._lock:
            rng = self._free.pop() if self._free else np.random.Generator(np.random.Philox(0))
        rng.bit_generator.state = {
            "bit_generator": "Philox",
            "state": {"counter": np.array([0, 0, 0, index], np.uint64), "key": self._key},
            "buffer": np.zeros(4, np.uint64),
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return rng

    def release(self, rng: np.random.Generator) -> None:
        with self._lock:
            self._free.append(rng)


class _TrainRecords(grain.MapDataset):
    """The endless stream of decoded, augmented records; element p is stream position p.

    One grain node doing what ``source.shuffle(s).repeat(None).map(decode)``, bad-record
    replacement and ``.random_map(augment, seed=a)`` would, with the same results (the same
    ``index_shuffle`` permutation per epoch, the same per-element Philox streams), but without
    five nodes' per-record bookkeeping (timers, output-spec and byte-size metrics), which cost
    as much as decoding a small JPEG.

    Element p is record ``shuffle_epoch(p // n)[p % n]`` decoded (``n = len(source)``), or if
    that raises ``BadRecordError``, the next good one of p + 1, p + 2, ... keeping its own
    label and carrying the bad record's message under ``"skipped"``; then, if ``augment`` is
    given, ``augment(image, rng_p)`` where ``rng_p`` depends only on (augment seed, p).
    """

    def __init__(
        self,
        source,
        *,
        shuffle_seed: int,
        decode: DecodeAndResize,
        augment: _AugmentImage | None,
        augment_seed: int,
        record_index: bool = False,
    ):
        super().__init__()
        if not 0 <= shuffle_seed < 2**32:
            raise ValueError(f"shuffle_seed must be a 32-bit unsigned integer: {shuffle_seed}")
        self._source = source
        self._num_records = len(source)
        self._shuffle_seed = int(shuffle_seed)
        self._decode = decode
        self._augment = augment
        self._rngs = _RngPool(augment_seed)
        self._record_index = record_index

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return "TrainRecords(shuffle, repeat, decode, replace bad records, augment)"

    def _decoded(self, position: int) -> dict:
        epoch, index_in_epoch = divmod(position, self._num_records)
        index = grain.experimental.index_shuffle(
            index_in_epoch,
            max_index=self._num_records - 1,
            seed=(self._shuffle_seed + epoch) % 2**32,
            rounds=4,
        )
        record = self._decode(self._source[index])
        if self._record_index:
            record["record"] = int(index)
        return record

    def _good_record(self, position: int) -> dict:
        try:
            return self._decoded(position)
        except BadRecordError as error:
            skipped = str(error)
        for offset in range(1, _MAX_CONSECUTIVE_BAD + 1):
            try:
                record = self._decoded(position + offset)
            except BadRecordError:
                continue
            record["skipped"] = skipped
            return record
        raise BadDataError(
            f"{_MAX_CONSECUTIVE_BAD + 1} consecutive unreadable records from stream position "
            f"{position}, the first: {skipped}"
        )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        record = self._good_record(index)
        if self._augment is None:
            return record
        rng = self._rngs.acquire(index)
        try:
            return self._augment(record, rng)
        finally:
            self._rngs.release(rng)


def _stack_records(records) -> dict:
    """Batches records into {"image": uint8 (b, H, W, 3), "label": int32 (b,), "skipped": keys}.

    ``"image_hr"`` is stacked too when present (paired mode), and ``"record"`` (the source
    index of each record, int32) when asked for; ``"skipped"`` is the tuple of bad
    records' messages replaced within this batch (usually empty).
    """
    batch = {
        "image": np.stack([record["image"] for record in records]),
        "label": np.asarray([record["label"] for record in records], np.int32),
    }
    if "image_hr" in records[0]:
        batch["image_hr"] = np.stack([record["image_hr"] for record in records])
    if "record" in records[0]:
        batch["record"] = np.asarray([record["record"] for record in records], np.int32)
    batch["skipped"] = tuple(record["skipped"] for record in records if "skipped" in record)
    return batch


class TrainIterator(grain.DatasetIterator):
    """The host's batch iterator: counts, reports and bounds the skipped bad records.

    Yields the pipeline's batches without their ``"skipped"`` field. ``skipped_records`` and
    ``seen_records`` count this host's records since the start of training (they are part of
    ``get_state``, so a resumed run continues the count).
    """

    def __init__(self, parent: grain.DatasetIterator, max_bad_share: float, epoch_records: int):
        super().__init__(parent)
        self.max_bad_share = max_bad_share
        self.min_records = max(1, min(_MIN_RECORDS_FOR_SHARE, epoch_records))
        self.skipped_records = 0
        self.seen_records = 0
        self._reported: set[str] = set()

    def __next__(self) -> dict:
        batch = dict(next(self._parent))
        skipped = batch.pop("skipped", ())
        self.seen_records += len(batch["label"])
        self.skipped_records += len(skipped)
        for message in skipped:
            if message not in self._reported and len(self._reported) < _MAX_REPORTED_KEYS:
                self._reported.add(message)
                _log.warning("Skipped a bad training record: %s", message)
        if (
            self.seen_records >= self.min_records
            and self.skipped_records > self.max_bad_share * self.seen_records
        ):
            raise BadDataError(
                f"{self.skipped_records} of the {self.seen_records} training records read on "
                f"this host were unreadable, more than config.data.max_bad_share="
                f"{self.max_bad_share}; first bad: {sorted(self._reported)[:3]}"
            )
        return batch

    def get_state(self) -> dict:
        return {
            "pipeline": self._parent.get_state(),
            "skipped_records": self.skipped_records,
            "seen_records": self.seen_records,
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["pipeline"])
        self.skipped_records = int(state["skipped_records"])
        self.seen_records = int(state["seen_records"])

    def __str__(self) -> str:
        return f"TrainIterator(max_bad_share={self.max_bad_share})"


def _pipeline_seeds(seed: int) -> tuple[int, int]:
    """Independent 32-bit seeds for the shuffle and the augmentation, derived from ``seed``."""
    shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


def _allow_absl_flag_reads() -> None:
    """Lets grain read its absl flags (defaults) outside ``absl.app.run``.

    Starting ``mp_prefetch`` workers reads ``--grain_enable_multiprocess_worker_profiling``;
    under pytest, a notebook or a plain script nobody parsed the command line, and absl raises
    ``UnparsedFlagAccessError``. Marking the flags parsed keeps every default.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_iterator(
    source,
    *,
    global_batch_size: int,
    seed: int,
    augment: Augment | None = None,
    image_size: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
    max_bad_share: float = 0.001,
    record_index: bool = False,
) -> TrainIterator:
    """An endless, resumable iterator over this host's training batches.

    Args:
      source: random-access source (``__len__``, ``__getitem__``) of
        ``{"image": uint8 (H, W, 3) or encoded bytes, "label": int}`` records (an optional
        ``"key"`` names the record in bad-data reports).
      global_batch_size: batch size summed over all hosts.
      seed: pipeline seed (shuffle order and augmentation both derive from it).
      augment: ``augment(image, rng) -> image`` applied to every record, or None. With
        ``worker_count > 0`` grain ships the dataset to its workers with cloudpickle, so
        closures are fine; whatever they capture must be picklable. It may return
        ``{"image": ..., "image_hr": ...}`` (paired mode).
      image_size: decoded images are resized to (image_size, image_size); None keeps them.
      shard_index, shard_count: this host's shard; default ``jax.process_index()`` and
        ``jax.process_count()``.
      worker_count: worker processes (grain ``mp_prefetch``); 0 computes in this process.
      prefetch: batches computed ahead: the thread prefetch buffer of the reading process and,
        with workers, each worker's output buffer. 0 reads synchronously.
      max_bad_share: the largest tolerated share of unreadable records (see the module doc).
      record_index: add ``"record"``, each image's index in ``source`` (a replaced bad record
        gives its replacement's), for per-record tables such as cached teacher embeddings.

    Returns:
      A ``TrainIterator`` yielding ``{"image": uint8 (b, H, W, 3), "label": int32 (b,)}``
      (plus ``"image_hr"`` in paired mode) with ``b = global_batch_size // shard_count``;
      supports ``get_state`` and ``set_state``.

    Raises:
      ValueError: if ``global_batch_size`` is not a positive multiple of ``shard_count``, is
        larger than the dataset, or the shard index is out of range.
    """
    if shard_index is None or shard_count is None:
        import jax  # only here: worker processes unpickling this module need not import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index=}, {shard_count=}")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of shard_count "
            f"{shard_count}"
        )
    if global_batch_size > len(source):
        raise ValueError(
            f"global_batch_size {global_batch_size} is larger than the dataset "
            f"({len(source)} records)"
        )
    if not 0.0 <= max_bad_share <= 1.0:
        raise ValueError(f"max_bad_share={max_bad_share} must be in [0, 1]")
    if worker_count < 0 or prefetch < 0:
        raise ValueError(
            f"need worker_count >= 0 and prefetch >= 0, got {worker_count=}, {prefetch=}"
        )
    shuffle_seed, augment_seed = _pipeline_seeds(seed)

    dataset = _TrainRecords(
        source,
        shuffle_seed=shuffle_seed,
        decode=DecodeAndResize(image_size),
        augment=None if augment is None else _AugmentImage(augment),
        augment_seed=augment_seed,
        record_index=record_index,
    )
    dataset = dataset[shard_index::shard_count]
    dataset = dataset.batch(
        global_batch_size // shard_count, drop_remainder=True, batch_fn=_stack_records
    )
    read_options = grain.ReadOptions(
        num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch
    )
    iter_dataset = dataset.to_iter_dataset(read_options)
    if worker_count > 0:
        _allow_absl_flag_reads()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1)
            )
        )
    return TrainIterator(iter(iter_dataset), max_bad_share, len(source) // shard_count)


def eval_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Fixed-size batches of ``images`` (N, ...), the last one zero-padded.

    Every batch has shape (batch_size, ...), so a jitted embedding function compiles once.

    Yields:
      (batch, valid): the batch and how many of its leading rows are real images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        valid = len(chunk)
        if valid < batch_size:
            padding = np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, padding])
        yield chunk, valid
