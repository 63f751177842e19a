"""Imprinted class centres (train/imprint.py) against a per-image numpy computation."""

import cv2
import jax
import numpy as np
import pytest

from facemoe_jax.core.images import normalize_images
from facemoe_jax.data.recordio import BadRecordError
from facemoe_jax.models import build_model
from facemoe_jax.train import imprint, loop
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from tests.train.test_step import tiny_config


class ListSource:
    """Records as a folder source gives them: encoded bytes, a label (-1: unlabelled)."""

    def __init__(self, images, labels, bad=()):
        self.records = []
        for k, (image, label) in enumerate(zip(images, labels)):
            data = b"" if k in bad else cv2.imencode(".png", image[..., ::-1])[1].tobytes()
            self.records.append({"image": data, "label": int(label), "key": f"img{k}"})

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        if not record["image"]:
            raise BadRecordError(f"{record['key']}: empty")
        return record


def test_centres_are_normalised_class_means_of_normalised_embeddings():
    config = tiny_config(num_classes=4)
    model = build_model(config.model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (14, 30, 30, 3), dtype=np.uint8)  # resized to 24 on the way
    labels = [0, 1, 0, 2, -1, 0, 1, 0, 2, 2, 1, 0, 1, 2]
    source = ListSource(images, labels, bad={3})
    variables = model.init(jax.random.key(0), np.zeros((1, 24, 24, 3), np.float32))
    means, counts = imprint.class_mean_embeddings(model, variables, source, 4, 24, 3, 4)
    # Record order, at most 3 per class, unlabelled and unreadable records skipped.
    used = {0: [0, 2, 5], 1: [1, 6, 10], 2: [8, 9, 13]}
    assert counts.tolist() == [3, 3, 3, 0]
    for label, indices in used.items():
        rows = []
        for k in indices:
            small = cv2.resize(images[k], (24, 24), interpolation=cv2.INTER_AREA)
            x = normalize_images(small[None].astype(np.uint8))
            e = np.asarray(model.apply(variables, x, train=False)[0], np.float64)[0]
            rows.append(e / np.linalg.norm(e))
        mean = np.mean(rows, axis=0)
        np.testing.assert_allclose(means[label], mean / np.linalg.norm(mean), atol=1e-5)
    assert not means[3].any()
    with pytest.raises(ValueError, match="imprint_images_per_class"):
        imprint.class_mean_embeddings(model, variables, source, 4, 24, 0)


def test_imprint_centres_replaces_the_found_classes_only():
    config = tiny_config(num_classes=3)
    model = build_model(config.model)
    optimizer, _ = optimizer_lib.build_optimizer(config.optimizer, 10)
    state = state_lib.create_train_state(model, optimizer, config)
    before = np.asarray(state.params["classifier"]["centers"]).copy()
    rng = np.random.default_rng(1)
    source = ListSource(rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8), [0, 0, 1, 1])
    config.loss.imprint_images_per_class = 2
    after = np.asarray(
        imprint.imprint_centres(state, model, source, config).params["classifier"]["centers"]
    )
    np.testing.assert_allclose(np.linalg.norm(after[:2], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(after[2:], before[2:])  # class 2 has no image; padding rows


def test_the_setting_is_checked():
    config = tiny_config()
    for field, value, message in [
        ("centre_init", "means", "config.loss.centre_init"),
        ("imprint_images_per_class", 0, "imprint_images_per_class"),
    ]:
        bad = config.copy_and_resolve_references()
        bad.loss.centre_init = "imprint"
        bad.loss[field] = value
        with pytest.raises(ValueError, match=message):
            loop._check_centre_init(bad)
    both = config.copy_and_resolve_references()
    both.loss.centre_init, both.init_classifier = "imprint", True
    with pytest.raises(ValueError, match="choose one"):
        loop._check_centre_init(both)
