"""Training data sources selected by `config.data.train`, checked against the config.

Known values: "synthetic" (the embedded procedural identities, no download). The data issue adds
RecordIO, image folders and TFDS here.
"""

import ml_collections

from facemoe_jax.data import synthetic


def train_source(config: ml_collections.ConfigDict):
    """A grain random-access source whose class count equals config.data.num_classes."""
    spec = config.data.train
    if spec == "synthetic":
        if config.data.synthetic_images_per_identity < 1:
            raise ValueError(
                "config.data.synthetic_images_per_identity="
                f"{config.data.synthetic_images_per_identity} must be >= 1"
            )
        source = synthetic.SyntheticFaces(
            num_identities=config.data.num_classes,
            images_per_identity=config.data.synthetic_images_per_identity,
            image_size=config.model.image_size,
            seed=config.seed,
            cache_images=config.data.synthetic_cache,
        )
    else:
        raise ValueError(f"config.data.train={spec!r} is not a known source (known: 'synthetic')")
    if source.num_classes != config.data.num_classes:
        raise ValueError(
            f"config.data.num_classes={config.data.num_classes} but {spec!r} has "
            f"{source.num_classes} classes"
        )
    return source
