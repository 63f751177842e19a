"""The grain training pipeline, normalisation and evaluation batches."""

import json
import os

import cv2
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from facemoe_jax.core.images import normalize_images
from facemoe_jax.data import augment, pipeline, synthetic

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
    order = [i for b in batches for i in record_indices(b)]
    epoch_0, epoch_1 = order[:NUM_RECORDS], order[NUM_RECORDS:]
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(NUM_RECORDS))
    assert epoch_0 != epoch_1 and epoch_0 != list(range(NUM_RECORDS))
    again = take(pipeline.train_iterator(IndexedSource(), global_batch_size=8, seed=1), 10)
    assert order == [i for b in again for i in record_indices(b)]
    other = take(pipeline.train_iterator(IndexedSource(), global_batch_size=8, seed=2), 5)
    assert order[:NUM_RECORDS] != [i for b in other for i in record_indices(b)]


def test_labels_follow_their_records():
    batch = next(pipeline.train_iterator(IndexedSource(), global_batch_size=16, seed=0))
    np.testing.assert_array_equal(batch["label"], np.array(record_indices(batch)) % 7)


def test_shards_are_disjoint_cover_the_data_and_interleave_the_global_batch():
    def host_batches(index, count):
        iterator = pipeline.train_iterator(
            IndexedSource(),
            global_batch_size=8,
            seed=3,
            augment=stamp_random_value,
            shard_index=index,
            shard_count=count,
        )
        return take(iterator, 5)  # 5 global batches of 8 = one epoch of 40

    host_0, host_1 = host_batches(0, 2), host_batches(1, 2)
    seen_0 = [i for b in host_0 for i in record_indices(b)]
    seen_1 = [i for b in host_1 for i in record_indices(b)]
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
            IndexedSource(),
            global_batch_size=8,
            seed=5,
            augment=stamp_random_value,
            worker_count=worker_count,
            prefetch=1,
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
        IndexedSource(),
        global_batch_size=8,
        seed=5,
        augment=stamp_random_value,
        worker_count=2,
        prefetch=1,
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
    out = normalize_images(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    out_jax = normalize_images(jnp.asarray(pixels))
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


# ---- Encoded sources, real degradations, paired mode and bad records.


class EncodedSource:
    """JPEG records of flat colours (value = index); the ones in ``bad`` are corrupt."""

    def __init__(self, count=40, bad=(), size=12):
        self.count, self.bad, self.size = count, set(bad), size

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        index = int(index)
        image = np.zeros((self.size, self.size, 3), np.uint8)
        image[: self.size // 2] = 5 * (index % 50)  # top half encodes the index
        data = cv2.imencode(".png", image)[1].tobytes()
        if index in self.bad:
            data = data[: len(data) // 2]  # truncated
        return {"image": data, "label": index % 7, "key": f"rec{index}"}


def official_augmenter(paired=False):
    config = demo.get_config().data
    augment.official_augmentation(config)
    config.update(noise_prob=0.3, jpeg_prob=0.3, gaussian_blur_prob=0.3)
    return augment.Augmenter(config, paired=paired)


def test_real_degradations_and_skips_are_identical_with_0_1_and_2_workers():
    def batches(worker_count):
        iterator = pipeline.train_iterator(
            EncodedSource(size=12, bad={3, 17}),
            global_batch_size=8,
            seed=11,
            image_size=16,
            augment=official_augmenter(paired=True),
            worker_count=worker_count,
            prefetch=1,
            max_bad_share=0.1,
        )
        result = take(iterator, 6)  # past the first epoch (40 records)
        skipped = iterator.skipped_records  # counted in the main process, whoever decoded
        iterator.close()
        return result, skipped

    reference, skipped = batches(0)
    assert skipped >= 2  # both bad records of epoch 1 (and any of epoch 2's first batch)
    assert reference[0]["image"].shape == (8, 16, 16, 3)  # decoded and resized
    assert reference[0]["image_hr"].shape == (8, 16, 16, 3)
    for worker_count in (1, 2):
        got_batches, got_skipped = batches(worker_count)
        assert got_skipped == skipped
        for want, got in zip(reference, got_batches):
            assert want.keys() == got.keys()
            for key in want:
                np.testing.assert_array_equal(want[key], got[key])
    hr = np.concatenate([b["image_hr"] for b in reference])
    lr = np.concatenate([b["image"] for b in reference])
    differs = [not np.array_equal(a, b) for a, b in zip(hr, lr)]
    assert 0.3 < np.mean(differs) < 1.0  # some LR images are degraded, some clean copies


def test_paired_hr_is_the_geometry_only_image_of_the_same_record():
    config = demo.get_config().data
    config.update(flip_prob=0.5, low_res_prob=1.0, low_res_min_ratio=0.25, low_res_max_ratio=0.25)
    batch = next(
        pipeline.train_iterator(
            EncodedSource(size=16),
            global_batch_size=16,
            seed=2,
            augment=augment.Augmenter(config, paired=True),
        )
    )
    for hr, lr, label in zip(batch["image_hr"], batch["image"], batch["label"]):
        index = int(hr[0, 0, 0]) // 5  # top half still carries the index (flips are left-right)
        assert index % 7 == label
        assert hr[:8].std() == 0 and lr.std() > 0  # HR clean; LR resampled across the edge


def test_corrupt_records_are_replaced_counted_and_reported_once(caplog):
    source = EncodedSource(count=40, bad={3, 17})
    iterator = pipeline.train_iterator(
        source, global_batch_size=8, seed=0, max_bad_share=0.1, worker_count=0
    )
    with caplog.at_level("WARNING"):
        batches = take(iterator, 10)  # two epochs
    assert iterator.skipped_records == 4 and iterator.seen_records == 80
    reported = [r.getMessage() for r in caplog.records if "bad training record" in r.message]
    assert len(reported) == 2 and any("rec3: truncated" in m for m in reported)
    # Every record keeps its own label; bad ones never appear; replacements are duplicates.
    first_epoch = np.concatenate([b["image"][:, 0, 0, 0] // 5 for b in batches[:5]])
    labels = np.concatenate([b["label"] for b in batches[:5]])
    np.testing.assert_array_equal(labels, first_epoch % 7)
    assert not {3, 17} & set(first_epoch.tolist()) and len(set(first_epoch.tolist())) == 38
    # The count is part of the checkpointable state.
    state = iterator.get_state()
    assert state["skipped_records"] == 4 and state["seen_records"] == 80


def test_too_many_bad_records_stop_with_a_clear_error():
    iterator = pipeline.train_iterator(
        EncodedSource(count=40, bad={1, 2, 3, 4, 5}),
        global_batch_size=8,
        seed=0,
        max_bad_share=0.05,
    )
    with pytest.raises(pipeline.BadDataError, match=r"max_bad_share=0.05.*rec"):
        take(iterator, 10)
    everything_bad = pipeline.train_iterator(
        EncodedSource(count=100, bad=range(100)), global_batch_size=8, seed=0
    )
    with pytest.raises(pipeline.BadDataError, match="consecutive unreadable records"):
        next(everything_bad)


def test_fused_record_stream_equals_grain_shuffle_repeat_map_random_map():
    """The one-node stream gives what grain's own nodes give (same permutations, same rngs)."""
    import grain

    source = EncodedSource(count=30, bad={4, 5, 21})
    augmenter = official_augmenter()
    shuffle_seed, augment_seed = pipeline._pipeline_seeds(3)
    fused = pipeline._TrainRecords(
        source,
        shuffle_seed=shuffle_seed,
        decode=pipeline.DecodeAndResize(16),
        augment=pipeline._AugmentImage(augmenter),
        augment_seed=augment_seed,
    )
    decoded = (
        grain.MapDataset.source(source)
        .shuffle(seed=shuffle_seed)
        .repeat(None)
        .map(pipeline.DecodeAndResize(16))
    )

    def good(position):  # the next good record, as the module doc specifies
        for offset in range(pipeline._MAX_CONSECUTIVE_BAD):
            try:
                return decoded[position + offset]
            except pipeline.BadRecordError:
                continue

    augmented = grain.MapDataset.range(10**6).random_map(
        lambda p, rng: augmenter(good(p)["image"], rng), seed=augment_seed
    )
    skipped = 0
    for position in range(75):  # two and a half epochs
        got = fused[position]
        want = good(position)
        assert got["label"] == want["label"] and got["key"] == want["key"]
        np.testing.assert_array_equal(got["image"], augmented[position])
        skipped += "skipped" in got
    assert skipped >= 6  # every bad record of each epoch was replaced


# ---- Decoding what real folders hold: every kind to uint8 RGB, against numpy references.

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LFW = os.path.join(REPO, "..", "shared", "realfaces", "lfw", "aligned112")


def colour_image(height=24, width=32, seed=0) -> np.ndarray:
    """RGB test image: smooth gradients plus noise (every channel different)."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 3))
    base = np.dstack([x * 200 // width, y * 200 // height, (x + y) * 100 // (height + width)])
    return (base + noise).astype(np.uint8)


def encode(ext: str, image: np.ndarray, *params) -> bytes:
    """OpenCV-encoded bytes of an RGB(A) or greyscale image (OpenCV writes BGR(A))."""
    if image.ndim == 3:
        image = cv2.cvtColor(
            image, cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        )
    ok, data = cv2.imencode(ext, image, list(params))
    assert ok
    return data.tobytes()


def exif_orientation_segment(orientation: int) -> bytes:
    """A JPEG APP1 segment holding an EXIF IFD with only the Orientation tag (0x0112)."""
    tiff = (
        b"MM\x00\x2a"
        + (8).to_bytes(4, "big")
        + (1).to_bytes(2, "big")
        + (0x0112).to_bytes(2, "big")
        + (3).to_bytes(2, "big")
        + (1).to_bytes(4, "big")
        + orientation.to_bytes(2, "big")
        + b"\x00\x00"
        + (0).to_bytes(4, "big")
    )
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload


def test_decode_converts_every_kind_to_8_bit_rgb_against_numpy():
    rgb = colour_image()
    grey = rgb[..., 1]
    deep = (
        rgb.astype(np.uint16) * 257 + np.arange(rgb.size, dtype=np.uint16).reshape(rgb.shape) % 200
    )
    scaled = np.floor(deep / 257.0 + 0.5).astype(np.uint8)  # 65535 -> 255, rounding
    assert not np.array_equal(scaled, (deep >> 8).astype(np.uint8))  # truncation would differ
    alpha = np.dstack([rgb, np.arange(grey.size, dtype=np.uint8).reshape(grey.shape)])
    cases = {
        "png": (encode(".png", rgb), rgb, ()),
        "bmp": (encode(".bmp", rgb), rgb, ()),
        "tiff": (encode(".tiff", rgb), rgb, ()),
        "ppm": (encode(".ppm", rgb), rgb, ()),
        "grey png": (encode(".png", grey), np.dstack([grey] * 3), ("greyscale",)),
        "pgm": (encode(".pgm", grey), np.dstack([grey] * 3), ("greyscale",)),
        "pbm": (
            encode(".pbm", (grey > 100).astype(np.uint8) * 255),
            np.dstack([(grey > 100) * 255] * 3),
            ("greyscale",),
        ),
        "16-bit png": (encode(".png", deep), scaled, ("16-bit",)),
        "16-bit tiff": (encode(".tiff", deep), scaled, ("16-bit",)),
        "16-bit grey png": (
            encode(".png", deep[..., 0]),
            np.dstack([scaled[..., 0]] * 3),
            ("greyscale", "16-bit"),
        ),
        "alpha png": (encode(".png", alpha), rgb, ("alpha",)),  # alpha dropped, colour kept
    }
    for name, (data, want, conversions) in cases.items():
        image, done = pipeline.decode_image_converting(data, name)
        assert image.dtype == np.uint8 and image.shape == (24, 32, 3), name
        np.testing.assert_array_equal(image, want, err_msg=name)
        assert done == conversions, name
        np.testing.assert_array_equal(pipeline.decode_image(data, name), want, err_msg=name)


def test_binary_pnm_with_its_own_maximum_is_scaled_to_255():
    values = np.array([[0, 300, 511, 1023]], np.uint16)
    data = b"P5\n# ten bits\n4 1\n1023\n" + values.astype(">u2").tobytes()
    image, conversions = pipeline.decode_image_converting(data)
    want = np.floor(values.astype(np.float64) * 255 / 1023 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(image, np.dstack([want] * 3))
    assert conversions == ("greyscale", "maximum 1023")
    small = b"P5\n3 1\n15\n" + bytes([0, 7, 15])  # 8-bit samples, maximum 15
    np.testing.assert_array_equal(pipeline.decode_image(small)[0, :, 0], [0, 119, 255])


def test_jpegs_greyscale_cmyk_and_exif_orientation():
    rgb = colour_image(32, 48)
    grey_jpeg = encode(".jpg", rgb[..., 0], cv2.IMWRITE_JPEG_QUALITY, 95)
    image, conversions = pipeline.decode_image_converting(grey_jpeg)
    reference = cv2.imdecode(np.frombuffer(grey_jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(image, np.dstack([reference] * 3))
    assert conversions == ("greyscale",)
    # Orientation 6: the stored picture is shown turned 90 degrees clockwise.
    jpeg = encode(".jpg", rgb, cv2.IMWRITE_JPEG_QUALITY, 95)
    upright = pipeline.decode_image(jpeg)
    turned = pipeline.decode_image(jpeg[:2] + exif_orientation_segment(6) + jpeg[2:])
    np.testing.assert_array_equal(turned, np.rot90(upright, k=-1))
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(upright, bgr[..., ::-1])
    pil = pytest.importorskip("PIL.Image")  # OpenCV writes no CMYK JPEG
    import io

    buffer = io.BytesIO()
    pil.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
    image, conversions = pipeline.decode_image_converting(buffer.getvalue())
    reference = np.asarray(pil.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert conversions == ("CMYK",) and np.abs(image.astype(int) - reference).max() <= 2


def test_jpeg_2000_decodes_where_opencv_has_the_codec():
    rgb = cv2.resize(colour_image(), (64, 64), interpolation=cv2.INTER_AREA)
    try:
        data = encode(".jp2", rgb)
    except cv2.error:
        pytest.skip("this OpenCV build writes no JPEG 2000")
    image, conversions = pipeline.decode_image_converting(data)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(image, bgr[..., ::-1])  # OpenCV's pixels, in RGB order
    assert conversions == () and np.abs(image.astype(int) - rgb).mean() < 5  # lossy codec


def test_decoded_arrays_are_converted_too_and_floats_refused():
    rgb = colour_image()
    assert pipeline.decode_image(rgb) is rgb  # the common case, untouched
    np.testing.assert_array_equal(pipeline.decode_image(rgb[..., 0]), np.dstack([rgb[..., 0]] * 3))
    deep = rgb.astype(np.uint16) * 257
    np.testing.assert_array_equal(pipeline.decode_image(deep), rgb)
    with pytest.raises(pipeline.BadRecordError, match="k3: float32 pixels are not supported"):
        pipeline.decode_image(rgb.astype(np.float32), "k3")


def test_decode_and_resize_takes_any_size_to_the_model_size():
    big, small = colour_image(50, 40), colour_image(10, 12)
    resize = pipeline.DecodeAndResize(16)
    got = resize({"image": encode(".png", big), "label": 0})["image"]
    np.testing.assert_array_equal(got, cv2.resize(big, (16, 16), interpolation=cv2.INTER_AREA))
    got = resize({"image": encode(".png", small), "label": 0})["image"]
    np.testing.assert_array_equal(got, cv2.resize(small, (16, 16), interpolation=cv2.INTER_LINEAR))


@pytest.mark.skipif(not os.path.isdir(LFW), reason="no real faces: ../shared/realfaces is absent")
def test_real_lfw_jpegs_and_converted_copies_decode_to_the_same_face(tmp_path):
    paths = [os.path.join(LFW, name, f"{name}_0001.jpg") for name in ("Zico", "Abdullah_Gul")]
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        image, conversions = pipeline.decode_image_converting(data, path)
        reference = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(image, reference)
        assert conversions == () and image.shape == (112, 112, 3)
        grey = cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY)
        copies = {
            "grey.jpg": (encode(".jpg", grey, cv2.IMWRITE_JPEG_QUALITY, 95), np.dstack([grey] * 3)),
            "grey.png": (encode(".png", grey), np.dstack([grey] * 3)),
            "alpha.png": (encode(".png", np.dstack([reference, grey])), reference),
            "16.png": (encode(".png", reference.astype(np.uint16) * 257), reference),
            "16.tiff": (encode(".tiff", reference.astype(np.uint16) * 257), reference),
            "95.jpg": (encode(".jpg", reference, cv2.IMWRITE_JPEG_QUALITY, 95), reference),
        }
        for name, (copy, want) in copies.items():
            got = pipeline.decode_image(copy, name).astype(int)
            lossy = name.endswith(".jpg")
            assert np.abs(got - want).mean() < (2.0 if lossy else 1e-9), name
            assert np.abs(got - want).max() <= (24 if lossy else 0), name
