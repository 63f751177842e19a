"""Training data sources selected by ``config.data.train``, checked against the config.

``config.data.train`` is one string, ``kind`` or ``kind:location``:

  "synthetic"            the embedded procedural identities (no download; sizes from the config)
  "synthetic_lr"         other synthetic identities, every image captured at low resolution
                         (``config.data.acquisition_*``): the stand-in for TinyFace's training set
  "synthetic_lr_hr"      the same identities as rendered, at full resolution: the capture then
                         comes from the augmenter (``config.data.acquisition_prob``), fresh each
                         epoch, and distillation's paired mode gives the teacher the render
  "recordio:/data/ms1m"  insightface RecordIO: a folder with train.rec/train.idx, or a .rec path
  "folder:/data/faces"   one sub-folder per identity, labels in sorted folder-name order
  "tfds:name[/config]"   a prepared TFDS data set (``config.data.tfds_split``,
                         ``tfds_data_dir``, ``image_key``, ``label_key``)
  "arrayrecord:/dir"     ArrayRecord files of RecordIO payloads (``facemoe_jax.data.pack``)

The data's class count must equal ``config.data.num_classes`` (the classifier's size), and when
``config.data.num_images`` is non-zero the image count must equal it: both are checked here,
before anything is compiled.
"""

import functools

import ml_collections

from facemoe_jax.data import degrade, folder, recordio, synthetic, tfds_sources

KINDS = ("synthetic", "synthetic_lr", "synthetic_lr_hr", "recordio", "folder", "tfds",
         "arrayrecord")  # fmt: skip
SYNTHETIC_KINDS = ("synthetic", "synthetic_lr", "synthetic_lr_hr")


def open_source(config: ml_collections.ConfigDict):
    """The source named by ``config.data.train`` (not yet checked against the config)."""
    spec = str(config.data.train)
    kind, _, location = spec.partition(":")
    if kind not in KINDS or (kind in SYNTHETIC_KINDS) == bool(location):
        raise ValueError(
            f"config.data.train={spec!r} is not a known source: use 'synthetic', "
            "'synthetic_lr', 'synthetic_lr_hr', 'recordio:PATH', 'folder:PATH', 'tfds:NAME' or "
            "'arrayrecord:PATH'"
        )
    if kind in SYNTHETIC_KINDS:
        if config.data.synthetic_images_per_identity < 1:
            raise ValueError(
                "config.data.synthetic_images_per_identity="
                f"{config.data.synthetic_images_per_identity} must be >= 1"
            )
        return synthetic.SyntheticFaces(
            num_identities=config.data.num_classes,
            images_per_identity=config.data.synthetic_images_per_identity,
            image_size=config.model.image_size,
            seed=config.seed,
            cache_images=config.data.synthetic_cache,
            **_low_resolution_identities(config.data, kind),
        )
    if kind == "recordio":
        return recordio.RecordIODataSource(location)
    if kind == "folder":
        return folder.ImageFolderSource(location)
    if kind == "arrayrecord":
        return tfds_sources.ArrayRecordSource(location)
    return tfds_sources.TfdsSource(
        location,
        split=config.data.tfds_split,
        data_dir=config.data.tfds_data_dir or None,
        image_key=config.data.image_key,
        label_key=config.data.label_key,
    )


def _low_resolution_identities(data_cfg, kind: str) -> dict:
    if kind == "synthetic":
        return {}
    if kind == "synthetic_lr_hr":
        return {"first_identity": synthetic.LR_TRAIN_FIRST_IDENTITY}
    capture = functools.partial(
        degrade.acquisition_low_resolution, **degrade.acquisition_settings(data_cfg)
    )
    return {"first_identity": synthetic.LR_TRAIN_FIRST_IDENTITY, "capture": capture}


def check_source(source, config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming both numbers if the data and the config disagree."""
    spec = config.data.train
    if source.num_classes != config.data.num_classes:
        raise ValueError(
            f"config.data.num_classes={config.data.num_classes} but {spec!r} has "
            f"{source.num_classes} classes"
        )
    expected_images = config.data.get("num_images", 0)
    if expected_images and source.num_images != expected_images:
        raise ValueError(
            f"config.data.num_images={expected_images} but {spec!r} has {source.num_images} images"
        )


def train_source(config: ml_collections.ConfigDict):
    """A grain random-access source whose class count equals config.data.num_classes."""
    source = open_source(config)
    check_source(source, config)
    return source
