"""Grain input pipeline: shuffled, sharded, augmented, batched records, and evaluation batches.

Training reads a random-access source (``{"image": uint8 HWC, "label": int}`` records, e.g.
``synthetic.SyntheticFaces``) through one grain ``MapDataset`` chain:

    source -> shuffle -> repeat forever -> random_map(augment) -> host shard -> batch
           -> to_iter_dataset (thread prefetch) [-> mp_prefetch (worker processes)]

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

Images stay uint8 all the way to the device: the jitted step normalises them with
``normalize_images``, so the host sends a quarter of the bytes float32 would need.
"""

from __future__ import annotations

from typing import Callable, Iterator

import grain
import numpy as np

Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def normalize_images(images):
    """uint8 pixels -> float32 in [-1, 1] by (x / 255 - 0.5) / 0.5, the FaceMoE convention.

    Works on numpy and jax arrays of any shape (e.g. (B, H, W, 3)); returns the same kind.
    """
    return (images.astype("float32") / 255.0 - 0.5) / 0.5


class _AugmentImage:
    """grain random_map transform applying ``augment(image, rng)`` to a record's image.

    A named class rather than a lambda so that the pipeline's repr and stats name it.
    """

    def __init__(self, augment: Augment):
        self.augment = augment

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        return {**record, "image": self.augment(record["image"], rng)}


def _stack_records(records) -> dict:
    """Batches records into {"image": uint8 (b, H, W, 3), "label": int32 (b,)}."""
    return {
        "image": np.stack([record["image"] for record in records]),
        "label": np.asarray([record["label"] for record in records], np.int32),
    }


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
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """An endless, resumable iterator over this host's training batches.

    Args:
      source: random-access source (``__len__``, ``__getitem__``) of
        ``{"image": uint8 (H, W, 3), "label": int}`` records.
      global_batch_size: batch size summed over all hosts.
      seed: pipeline seed (shuffle order and augmentation both derive from it).
      augment: ``augment(image, rng) -> image`` applied to every record, or None. With
        ``worker_count > 0`` grain ships the dataset to its workers with cloudpickle, so
        closures are fine; whatever they capture must be picklable.
      shard_index, shard_count: this host's shard; default ``jax.process_index()`` and
        ``jax.process_count()``.
      worker_count: worker processes (grain ``mp_prefetch``); 0 computes in this process.
      prefetch: batches computed ahead: the thread prefetch buffer of the reading process and,
        with workers, each worker's output buffer. 0 reads synchronously.

    Returns:
      A grain ``DatasetIterator`` yielding ``{"image": uint8 (b, H, W, 3), "label": int32
      (b,)}`` with ``b = global_batch_size // shard_count``; supports ``get_state`` and
      ``set_state``.

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
    if worker_count < 0 or prefetch < 0:
        raise ValueError(f"need worker_count >= 0 and prefetch >= 0, got {worker_count=}, {prefetch=}")
    shuffle_seed, augment_seed = _pipeline_seeds(seed)

    dataset = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)
    if augment is not None:
        dataset = dataset.random_map(_AugmentImage(augment), seed=augment_seed)
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
    return iter(iter_dataset)


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
