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

``config.data.num_classes`` is the classifier's size: 0 takes it from the data (``with_data_counts``
writes the number into the config, so checkpoints and exports hold it); any other value must
equal the data's class count. When ``config.data.num_images`` is non-zero the image count must
equal it. Both are checked here, before anything is compiled.

The synthetic sources render ``config.data.synthetic_identities`` identities, or
``config.data.num_classes`` of them when that is non-zero (what it meant before the field
existed, so older command lines still mean the same): config files set the former, so a real
data set given on the command line brings its own count without a second flag.

Image folders only: ``config.data.people_file`` / ``exclude_people_file`` choose identities and
``min_images_per_identity`` leaves the smaller ones unlabelled (``folder.py``); ``check_images``
decodes every image before compiling and stops on undecodable ones (more than
``config.data.max_bad_share`` of them), naming them.
"""

import functools

import ml_collections

from facemoe_jax.core import defaults, messages
from facemoe_jax.data import degrade, folder, recordio, synthetic, tfds_sources

# Image-folder options and their "not used" values.
FOLDER_OPTIONS = ("people_file", "exclude_people_file", "min_images_per_identity")
# Undecodable files named in the error line (the rest are counted).
_SHOWN_BAD = 5

SYNTHETIC_KINDS = ("synthetic", "synthetic_lr", "synthetic_lr_hr")
KINDS = SYNTHETIC_KINDS + ("recordio", "folder", "tfds", "arrayrecord")


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
    _check_folder_options(config.data, kind)
    if kind in SYNTHETIC_KINDS:
        if synthetic_identities(config.data) < 1:
            raise ValueError(
                f"config.data.synthetic_identities={config.data.synthetic_identities} "
                f"(with config.data.num_classes={config.data.num_classes}): synthetic data "
                "need a number of identities to render"
            )
        if config.data.synthetic_images_per_identity < 1:
            raise ValueError(
                "config.data.synthetic_images_per_identity="
                f"{config.data.synthetic_images_per_identity} must be >= 1"
            )
        return synthetic.SyntheticFaces(
            num_identities=synthetic_identities(config.data),
            images_per_identity=config.data.synthetic_images_per_identity,
            image_size=config.model.image_size,
            seed=config.seed,
            cache_images=config.data.synthetic_cache,
            **_low_resolution_identities(config.data, kind),
        )
    if kind == "recordio":
        return recordio.RecordIODataSource(location)
    if kind == "folder":
        return folder.ImageFolderSource(
            location,
            people_file=config.data.people_file or None,
            exclude_people_file=config.data.exclude_people_file or None,
            min_images_per_identity=config.data.min_images_per_identity,
        )
    if kind == "arrayrecord":
        return tfds_sources.ArrayRecordSource(location)
    return tfds_sources.TfdsSource(
        location,
        split=config.data.tfds_split,
        data_dir=config.data.tfds_data_dir or None,
        image_key=config.data.image_key,
        label_key=config.data.label_key,
    )


def synthetic_identities(data_cfg) -> int:
    """How many identities a synthetic source renders: ``num_classes`` when non-zero, else
    ``synthetic_identities``."""
    return int(data_cfg.num_classes or data_cfg.synthetic_identities)


def _low_resolution_identities(data_cfg, kind: str) -> dict:
    if kind == "synthetic":
        return {}
    if kind == "synthetic_lr_hr":
        return {"first_identity": synthetic.LR_TRAIN_FIRST_IDENTITY}
    capture = functools.partial(
        degrade.acquisition_low_resolution, **degrade.acquisition_settings(data_cfg)
    )
    return {"first_identity": synthetic.LR_TRAIN_FIRST_IDENTITY, "capture": capture}


def _check_folder_options(data_cfg, kind: str) -> None:
    """The people files and the minimum image count select identities of image folders only."""
    unset = defaults.get_base_config().data
    used = [
        f"config.data.{field}={data_cfg[field]!r}"
        for field in FOLDER_OPTIONS
        if data_cfg[field] not in (unset[field], None)
    ]
    if used and kind != "folder":
        raise ValueError(
            f"{used[0]} applies to image folders only (config.data.train='folder:PATH'), not "
            f"to {data_cfg.train!r}"
        )


def _reads_every_label(ri: ml_collections.ConfigDict) -> bool:
    """Whether the recognizability objectives use every training image's class: the index and
    its diversion loss compare an image with its class prototype, as the quality head's
    "prototype" and "own_full" targets do; the "agreement" target leaves images of no class out
    of its loss (losses/class_means.py: no class mean, weight 0), so with the diversion loss off
    (a quality head trained on a frozen encoder) unlabelled images do no harm."""
    if not ri.enabled:
        return False
    quality_reads = ri.quality_weight > 0 and ri.quality_target != "agreement"
    return ri.diversion_weight > 0 or quality_reads


def check_source(source, config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming both numbers if the data and the config disagree."""
    spec = config.data.train
    if config.data.num_classes and source.num_classes != config.data.num_classes:
        raise ValueError(
            f"config.data.num_classes={config.data.num_classes} but {spec!r} has "
            f"{source.num_classes} classes (0 takes the count from the data)"
        )
    if source.num_classes < 1:
        raise ValueError(
            f"{spec!r} has no labelled identity: config.data.min_images_per_identity="
            f"{config.data.min_images_per_identity} leaves every one out"
        )
    unlabelled = getattr(source, "num_unlabelled_images", 0)
    if unlabelled and _reads_every_label(config.recognizability):
        raise ValueError(
            f"config.recognizability.enabled needs a class for every image (its diversion "
            f"loss, its quality target {config.recognizability.quality_target!r}), but "
            f"config.data.min_images_per_identity={config.data.min_images_per_identity} leaves "
            f"{unlabelled} images of {spec!r} without one"
        )
    expected_images = config.data.num_images
    if expected_images and source.num_images != expected_images:
        raise ValueError(
            f"config.data.num_images={expected_images} but {spec!r} has {source.num_images} images"
        )


def train_source(config: ml_collections.ConfigDict):
    """A grain random-access source whose class count equals config.data.num_classes (or any
    count when that is 0: see ``with_data_counts``)."""
    source = open_source(config)
    check_source(source, config)
    return source


def with_data_counts(config: ml_collections.ConfigDict, source=None) -> ml_collections.ConfigDict:
    """``config`` with ``data.num_classes`` 0 replaced by the data's class count (a copy; the
    config unchanged when it gives the count): what anything that builds a train state from a
    config needs first.

    source: the training source already opened for ``config`` (the loop's), so a folder is
      listed once; None opens and checks it here (``train_source``).
    """
    if config.data.num_classes:
        return config
    if source is None:
        source = train_source(config)
    resolved = config.copy_and_resolve_references()
    resolved.data.num_classes = int(source.num_classes)
    return resolved


def check_images(source, config: ml_collections.ConfigDict) -> folder.ImageCheck | None:
    """Decodes every image of an image folder once, before anything is compiled.

    Prints one line (how many images, how long, what decoding converts or resizes) and warns
    about files left out for their extension. Other sources are not checked (None): packs
    were checked when written (``facemoe_jax.data.pack``).

    Raises:
      BadDataError: when more than ``config.data.max_bad_share`` of the images do not decode,
        naming them and how to go on; fewer are named in a warning and skipped in training.
    """
    if not isinstance(source, folder.ImageFolderSource):
        return None
    from facemoe_jax.data.pipeline import BadDataError  # imports grain

    if source.ignored_files:
        kinds = ", ".join(f"{ext} {n}" for ext, n in source.ignored_files.most_common(5))
        count = sum(source.ignored_files.values())
        messages.warning(
            f"{count} {'file' if count == 1 else 'files'} in the identity folders of "
            f"{source.root} not images by extension, left out ({kinds}); "
            f"image extensions: {' '.join(folder.IMAGE_EXTENSIONS)}"
        )
    found = folder.check_images(
        source.paths, config.model.image_size, label=f"check images of {config.data.train}"
    )
    if not found.bad:
        return found
    named = "; ".join(why for _, why in found.bad[:_SHOWN_BAD])
    more = f"; and {len(found.bad) - _SHOWN_BAD} more" if len(found.bad) > _SHOWN_BAD else ""
    share = config.data.max_bad_share
    if len(found.bad) > share * found.num_images:
        raise BadDataError(
            f"{len(found.bad)} of the {found.num_images} images of {config.data.train!r} do "
            f"not decode, more than config.data.max_bad_share={share}: {named}{more}. Remove "
            f"them, or pack the folder with `python -m facemoe_jax.data.pack --images "
            f"{source.root} --out OUT` (it leaves them out) and train on "
            "--config.data.train=recordio:OUT"
        )
    messages.warning(
        f"{len(found.bad)} of the {found.num_images} images do not decode (within "
        f"config.data.max_bad_share={share}; training skips them): {named}{more}"
    )
    return found
