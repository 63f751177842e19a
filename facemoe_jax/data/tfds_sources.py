"""TFDS data sources and ArrayRecord files: random-access sources without a tf.data pipeline.

``TfdsSource`` opens a prepared TFDS data set with ``tfds.data_source`` (ArrayRecord-backed,
random access) and asks it *not* to decode images (``tfds.decode.SkipDecoding``): the grain
pipeline decodes, so a corrupt image is skipped and counted like any other, and decoding runs in
grain's workers. ``ArrayRecordSource`` reads ArrayRecord files whose records are insightface
RecordIO payloads (header + label + encoded image), as ``python -m facemoe_jax.data.pack
--to-array-record`` writes them, with the counts in a ``meta.json`` beside them.

Both sources open their readers lazily in each process, so they pickle into grain's workers as
names and paths.
"""

from __future__ import annotations

import glob
import json
import os

from facemoe_jax.data.recordio import BadRecordError, class_id, unpack_payload

META_FILE = "meta.json"


class TfdsSource:
    """``tfds.data_source(name, split)`` records as ``{"image": bytes, "label": int, "key"}``."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        self.name, self.split, self.data_dir = name, split, data_dir or None
        self.image_key, self.label_key = image_key, label_key
        self._source = None
        builder = self._builder()
        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(
                    f"TFDS data set {name!r} has no feature {key!r} (features: "
                    f"{sorted(features.keys())}); set config.data.image_key / label_key"
                )
        self._num_classes = getattr(features[label_key], "num_classes", None)
        self._length = len(self._data_source())

    def _builder(self):
        import tensorflow_datasets as tfds

        return tfds.builder(self.name, data_dir=self.data_dir)

    def _data_source(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(
                self.name,
                split=self.split,
                data_dir=self.data_dir,
                download=False,
                decoders={self.image_key: tfds.decode.SkipDecoding()},
            )
        return self._source

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    @property
    def num_images(self) -> int:
        return self._length

    @property
    def num_classes(self) -> int:
        """The label feature's ``num_classes``, or max label + 1 over a full scan."""
        if self._num_classes is None:
            source = self._data_source()
            self._num_classes = 1 + max(int(source[i][self.label_key]) for i in range(len(self)))
        return self._num_classes

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        record = self._data_source()[int(index)]
        return {
            "image": record[self.image_key],
            "label": int(record[self.label_key]),
            "key": f"tfds:{self.name}/{self.split}[{int(index)}]",
        }

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, num_images={len(self)})"


class ArrayRecordSource:
    """ArrayRecord files of RecordIO payloads: ``path`` is a folder of ``*.array_record``."""

    def __init__(self, path: str):
        self.path = path
        self.paths = sorted(glob.glob(os.path.join(path, "*.array_record")))
        if not self.paths:
            raise FileNotFoundError(f"no *.array_record files in {path}")
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"{meta_path} is missing (written by python -m facemoe_jax.data.pack "
                "--to-array-record with the image and class counts)"
            )
        with open(meta_path) as f:
            meta = json.load(f)
        self._num_classes = int(meta["num_classes"])
        self._source = None
        self._length = len(self._reader())
        if self._length != int(meta["num_images"]):
            raise ValueError(
                f"{meta_path} says {meta['num_images']} images but the files hold {self._length}"
            )

    def _reader(self):
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    @property
    def num_images(self) -> int:
        return self._length

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        key = f"{self.path}[{int(index)}]"
        try:
            _, label, image = unpack_payload(self._reader()[int(index)])
        except ValueError as e:
            raise BadRecordError(f"{key}: {e}") from None
        return {"image": image, "label": class_id(label), "key": key}

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.path!r}, num_images={len(self)})"
