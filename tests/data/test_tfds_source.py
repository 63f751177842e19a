"""A prepared TFDS data set (ArrayRecord, random access) as a training source."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from facemoe_jax.core import defaults
from facemoe_jax.data import sources
from facemoe_jax.data.pipeline import decode_image
from facemoe_jax.data.tfds_sources import TfdsSource


class TinyTfdsFaces(tfds.core.GeneratorBasedBuilder):
    """Nine 16x16 images of 3 identities; image i is filled with the value 20 * i."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(16, 16, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(9):
            yield i, {"image": np.full((16, 16, 3), 20 * i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    TinyTfdsFaces(data_dir=directory, file_format="array_record").download_and_prepare()
    return directory


def test_records_are_encoded_images_with_their_labels(data_dir):
    source = TfdsSource("tiny_tfds_faces", data_dir=data_dir)
    assert len(source) == 9 and source.num_classes == 3
    seen = {}
    for i in range(len(source)):
        record = source[i]
        image = decode_image(record["image"], key=str(record.get("key", i)))
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        seen[int(image[0, 0, 0]) // 20] = int(record["label"])
    # Every example once (TFDS may store them in any order), each with its own label.
    assert seen == {i: i % 3 for i in range(9)}


def _config(data_dir, **data):
    config = defaults.get_base_config()
    config.model.image_size = 16
    config.data.update(
        train="tfds:tiny_tfds_faces",
        num_classes=3,
        tfds_data_dir=data_dir,
        synthetic_images_per_identity=1,
    )
    config.data.update(data)
    return config


def test_selected_by_config_and_checked_against_it(data_dir):
    assert len(sources.train_source(_config(data_dir))) == 9
    with pytest.raises(ValueError, match="num_classes=4"):
        sources.train_source(_config(data_dir, num_classes=4))
    with pytest.raises(ValueError, match="no feature 'face'"):
        sources.train_source(_config(data_dir, image_key="face"))
