"""The grain training pipeline, normalisation and evaluation batches."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.data import pipeline, synthetic

NUM_RECORDS = 40


class IndexedSource:
    """Cheap source whose image encodes the record index, so batches can be traced back."""

    def __len__(self):
        return NUM_RECORDS

    def __getitem__(self, index):
        image = np.zeros((4, 4, 3), np.uint8)
        image[0, 0, 0] = index
        return {"image": image, "label": index % 7}


def record_indices(batch) -> list[int]:
    return batch["image"][:, 0, 0, 0].astype(int).tolist()


def stamp_random_value(image, rng):
    """Augmentation that writes one draw of its generator into the image (module level: picklable)."""
    image = image.copy()
    image[1, 1, :] = rng.integers(256)
    return image


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_batches_have_per_host_shapes_and_dtypes():
    source = synthetic.SyntheticFaces(4, 3, 32, seed=0)
    iterator = pipeline.train_iterator(
        source, global_batch_size=4, seed=0, shard_index=0, shard_count=2, prefetch=0
    )
    batch = next(iterator)
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (2,) and batch["label"].dtype == np.int32
    assert set(batch["label"].tolist()) <= set(range(4))


def test_default_shard_is_this_process():
    iterator = pipeline.train_iterator(IndexedSource(), global_batch_size=8, seed=0)
    assert next(iterator)["image"].shape[0] == 8  # one process: the host batch is the global one


def test_each_epoch_is_a_fresh_permutation_and_seeds_are_reproducible():
    batches = take(pipeline.train_iterator(IndexedSource(), global_batch_size=8, seed=1), 10)
    order = sum((record_indices(b) for b in batches), [])
    epoch_0, epoch_1 = order[:NUM_RECORDS], order[NUM_RECORDS:]
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(NUM_RECORDS))
    assert epoch_0 != epoch_1 and epoch_0 != list(range(NUM_RECORDS))
    again = take(pipeline.train_iterator(IndexedSource(), global_batch_size=8, seed=1), 10)
    assert order == sum((record_indices(b) for b in again), [])
    other = take(pipeline.train_iterator(IndexedSource(), global_batch_size=8, seed=2), 5)
    assert order[:NUM_RECORDS] != sum((record_indices(b) for b in other), [])


def test_labels_follow_their_records():
    batch = next(pipeline.train_iterator(IndexedSource(), global_batch_size=16, seed=0))
    np.testing.assert_array_equal(batch["label"], np.array(record_indices(batch)) % 7)


def test_shards_are_disjoint_cover_the_data_and_interleave_the_global_batch():
    def host_batches(index, count):
        iterator = pipeline.train_iterator(
            IndexedSource(), global_batch_size=8, seed=3, augment=stamp_random_value,
            shard_index=index, shard_count=count,
        )
        return take(iterator, 5)  # 5 global batches of 8 = one epoch of 40

    host_0, host_1 = host_batches(0, 2), host_batches(1, 2)
    seen_0 = sum((record_indices(b) for b in host_0), [])
    seen_1 = sum((record_indices(b) for b in host_1), [])
    assert not set(seen_0) & set(seen_1)
    assert sorted(seen_0 + seen_1) == list(range(NUM_RECORDS))
    # Global batch j, split over hosts, is the single-host batch j (augmentation included).
    for single, part_0, part_1 in zip(host_batches(0, 1), host_0, host_1):
        np.testing.assert_array_equal(single["image"][0::2], part_0["image"])
        np.testing.assert_array_equal(single["image"][1::2], part_1["image"])


def test_state_restore_resumes_with_identical_batches():
    def make():
        return pipeline.train_iterator(
            IndexedSource(), global_batch_size=8, seed=4, augment=stamp_random_value
        )

    iterator = make()
    take(iterator, 7)  # into the second epoch
    state = iterator.get_state()
    assert json.loads(json.dumps(state)) == state  # fits in a checkpoint as JSON
    expected = take(iterator, 4)
    resumed = make()
    resumed.set_state(state)
    for want, got in zip(expected, take(resumed, 4)):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])


def test_augmentation_depends_on_position_not_on_worker_count():
    def batches(worker_count):
        iterator = pipeline.train_iterator(
            IndexedSource(), global_batch_size=8, seed=5, augment=stamp_random_value,
            worker_count=worker_count, prefetch=1,
        )
        result = take(iterator, 3)
        state = iterator.get_state()
        result += take(iterator, 2)
        iterator.close()
        return result, state

    in_process, _ = batches(0)
    with_workers, state = batches(2)  # grain mp_prefetch: two spawned worker processes
    stamps = np.concatenate([b["image"][:, 1, 1, 0] for b in in_process])
    assert len(np.unique(stamps)) > 20  # the augmentation really draws per record
    for want, got in zip(in_process, with_workers):
        np.testing.assert_array_equal(want["image"], got["image"])
    # The multiprocess iterator's state resumes a fresh iterator with the same worker count
    # (its state records each worker's position, so it is not portable across worker counts).
    resumed = pipeline.train_iterator(
        IndexedSource(), global_batch_size=8, seed=5, augment=stamp_random_value,
        worker_count=2, prefetch=1,
    )
    resumed.set_state(state)
    for want, got in zip(in_process[3:], take(resumed, 2)):
        np.testing.assert_array_equal(want["image"], got["image"])
    resumed.close()


def test_bad_batch_sizes_raise_with_the_numbers():
    with pytest.raises(ValueError, match="global_batch_size 10 .* shard_count 4"):
        pipeline.train_iterator(
            IndexedSource(), global_batch_size=10, seed=0, shard_index=0, shard_count=4
        )
    with pytest.raises(ValueError, match="64 is larger than the dataset \\(40 records\\)"):
        pipeline.train_iterator(
            IndexedSource(), global_batch_size=64, seed=0, shard_index=0, shard_count=1
        )
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.train_iterator(
            IndexedSource(), global_batch_size=8, seed=0, shard_index=2, shard_count=2
        )


def test_normalize_images_maps_bytes_to_minus_one_one():
    pixels = np.array([[0, 128, 255]], np.uint8)
    expected = np.array([[-1.0, (128 / 255 - 0.5) / 0.5, 1.0]], np.float32)
    out = pipeline.normalize_images(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    out_jax = pipeline.normalize_images(jnp.asarray(pixels))
    assert out_jax.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_jax), expected, rtol=0, atol=1e-7)


def test_eval_batches_pad_the_last_batch_and_report_valid_rows():
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3) + 1
    batches = list(pipeline.eval_batches(images, 4))
    assert [valid for _, valid in batches] == [4, 4, 2]
    assert all(batch.shape == (4, 2, 2, 3) and batch.dtype == np.uint8 for batch, _ in batches)
    np.testing.assert_array_equal(
        np.concatenate([batch[:valid] for batch, valid in batches]), images
    )
    assert not batches[-1][0][2:].any()  # zero padding
    with pytest.raises(ValueError, match="batch_size"):
        list(pipeline.eval_batches(images, 0))
