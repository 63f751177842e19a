"""Procedural synthetic face identities: the embedded default dataset.

There is no real face data on the machines this project is developed on, so the demo trains on
faces drawn here. An *identity* is a point in a space of continuous and discrete traits (face
shape, skin tone, eye geometry and iris colour, eyebrows, nose, mouth, hair colour and hairline,
facial hair, and a fine-scale skin texture with identity-specific moles). An *image* of that
identity adds per-image nuisance (pose, expression, lighting, background, noise). Because every
identity is a fresh draw from the same trait distribution, a model that learns to read traits
generalises to identities it never saw: this is what metric learning needs, and what the
held-out verification pairs test.

Resolution matters by construction. Coarse traits (skin tone, hair colour and outline, face
shape) survive an 8 px image, but much of the identity lives in detail that is a few pixels wide
at 64..112 px (eye shape and iris colour, eyebrow shape, lip outline, moles, the orientation and
frequency of the skin texture) and is gone after downsampling; per-image lighting and colour
casts blur the coarse colour cues. So verification accuracy drops at very low resolution, as it
does on real low-resolution faces.

Coordinates. The image spans [-1, 1] on both axes (x to the right, y down), like an aligned face
crop: the eyes sit near y = -0.15, the mouth near y = 0.55, the chin near the bottom edge.
Traits are expressed in *face units* (the same [-1, 1] frame before the per-image similarity
transform). Shapes are implicit functions evaluated on the pixel grid with soft edges one pixel
wide, which anti-aliases without supersampling; textures finer than ~2.5 pixels fade out instead
of aliasing (a box filter's behaviour).

Determinism conventions:
  - traits of identity ``i`` come from ``np.random.default_rng([seed, i])``;
  - image ``k`` of identity ``i`` comes from ``np.random.default_rng([seed, i, _IMAGE_STREAM, k])``;
  - training identities are ``0 .. n-1`` (``first_identity=0``); evaluation identities start at
    ``HELD_OUT_FIRST_IDENTITY = 1_000_000``, a range no training source reaches, so evaluation
    faces are people the model never saw.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from facemoe_jax.data.face_render import render_face
from facemoe_jax.data.face_traits import identity_traits

HELD_OUT_FIRST_IDENTITY = 1_000_000
# The low-resolution training set ("synthetic_lr", a stand-in for TinyFace's training split):
# identities disjoint from HR pre-training (0 .. n-1, n < 500,000) and from evaluation.
LR_TRAIN_FIRST_IDENTITY = 500_000
# The synthetic TinyFace-like identification protocol (evaluate/synthetic_tinyface.py).
TINYFACE_FIRST_IDENTITY = 2_000_000
# The face-quality evaluation's identities (evaluate/recognizability.py `quality_identity_set`):
# held out like the verification pairs' (1,000,000 + 0 .. 999), and not among them.
QUALITY_FIRST_IDENTITY = HELD_OUT_FIRST_IDENTITY + 100_000
_IMAGE_STREAM = 0x1A6E  # separates per-image draws from per-identity draws
_PAIR_STREAM = 0x9A125  # separates verification-pair sampling from everything else
_CAPTURE_STREAM = 0xCA97  # the per-image capture degradation of a low-resolution source


@functools.lru_cache(maxsize=4096)
def _cached_traits(identity: int, seed: int) -> dict:
    return identity_traits(identity, seed)


def render_identity_image(
    identity: int, image_index: int, image_size: int, seed: int
) -> np.ndarray:
    """Image ``image_index`` of ``identity``: a pure function of its arguments, uint8 (S, S, 3)."""
    rng = np.random.default_rng([seed, identity, _IMAGE_STREAM, image_index])
    return render_face(_cached_traits(identity, seed), rng, image_size)


def capture_identity_image(
    identity: int, image_index: int, image_size: int, seed: int, capture: Callable
) -> np.ndarray:
    """``render_identity_image`` as a camera captured it: ``capture(image, rng)`` with a
    generator of its own per (seed, identity, image), so the low-resolution copy of an image is
    fixed (a data set captured small, like TinyFace) and independent of the render's draws."""
    image = render_identity_image(identity, image_index, image_size, seed)
    return capture(image, capture_generator(identity, image_index, seed))


def capture_generator(identity: int, image_index: int, seed: int) -> np.random.Generator:
    """The random stream of one image's low-resolution capture."""
    return np.random.default_rng([seed, identity, _CAPTURE_STREAM, image_index])


class SyntheticFaces:
    """Random-access source of synthetic face images (a grain data source).

    Record ``i`` is image ``i % images_per_identity`` of identity
    ``first_identity + i // images_per_identity`` (identity-major, so a contiguous slice holds
    whole identities; training shuffles anyway). Each record is
    ``{"image": uint8 (S, S, 3) RGB, "label": int}`` with label ``identity - first_identity``
    in ``0 .. num_identities - 1``. The image is a pure function of (seed, identity, image
    index): the same record always has the same bytes, in any process. With ``capture`` (e.g.
    ``degrade.acquisition_low_resolution``) every image is the low-resolution capture of that
    render, also fixed per record (``capture_identity_image``).

    Training uses ``first_identity=0``; evaluation uses identities from
    ``HELD_OUT_FIRST_IDENTITY`` (1,000,000) on, disjoint from any training source with fewer
    than a million identities.

    Rendering costs about 1 ms per 64 px image, and training revisits every image once per
    epoch; ``cache_images=True`` keeps each rendered image (num_images * S * S * 3 bytes, e.g.
    110 MB for 16,000 images at 48 px) so later epochs only copy bytes. The cache is per
    process, is not pickled (grain workers start with an empty one), and its images are
    read-only (augmentations must copy, as ``degrade``'s functions do).
    """

    def __init__(
        self,
        num_identities: int,
        images_per_identity: int,
        image_size: int,
        seed: int,
        first_identity: int = 0,
        *,
        cache_images: bool = False,
        capture: Callable | None = None,
    ):
        if num_identities < 1 or images_per_identity < 1 or image_size < 1:
            raise ValueError(
                f"need num_identities, images_per_identity, image_size >= 1, got "
                f"{num_identities=}, {images_per_identity=}, {image_size=}"
            )
        if first_identity < 0 or seed < 0:
            raise ValueError(f"need first_identity, seed >= 0, got {first_identity=}, {seed=}")
        self.num_identities = int(num_identities)
        self.images_per_identity = int(images_per_identity)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.first_identity = int(first_identity)
        self.cache_images = bool(cache_images)
        self.capture = capture
        self._cache: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}

    @property
    def num_classes(self) -> int:
        return self.num_identities

    @property
    def num_images(self) -> int:
        return self.num_identities * self.images_per_identity

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, record_key: int) -> dict:
        record_key = int(record_key)
        if not 0 <= record_key < self.num_images:
            raise IndexError(f"record {record_key} out of range [0, {self.num_images})")
        label, image_index = divmod(record_key, self.images_per_identity)
        image = self._cache.get(record_key)
        if image is None:
            identity = self.first_identity + label
            if self.capture is None:
                image = render_identity_image(identity, image_index, self.image_size, self.seed)
            else:
                image = capture_identity_image(
                    identity, image_index, self.image_size, self.seed, self.capture
                )
            if self.cache_images:
                image.flags.writeable = False  # shared between calls: protect the cache
                self._cache[record_key] = image
        return {"image": image, "label": label}

    def __repr__(self) -> str:
        return (
            f"SyntheticFaces(num_identities={self.num_identities}, "
            f"images_per_identity={self.images_per_identity}, image_size={self.image_size}, "
            f"seed={self.seed}, first_identity={self.first_identity}"
            f"{', captured low-resolution' if self.capture is not None else ''})"
        )


def verification_pairs(
    *,
    num_pairs: int,
    image_size: int,
    seed: int,
    first_identity: int = HELD_OUT_FIRST_IDENTITY,
    num_identities: int = 1000,
    images_per_identity: int = 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A balanced, deterministic LFW-style pair set over held-out identities.

    Pairs alternate same / different (even positions are same-identity pairs), so every
    contiguous tenth used by 10-fold verification holds both kinds in equal number (when
    ``num_pairs`` is a multiple of 20). A same pair shows two different images of one identity;
    a different pair shows images of two different identities. Identities are drawn from
    ``first_identity .. first_identity + num_identities - 1`` and image indices from
    ``0 .. images_per_identity - 1``; the images are exactly those a ``SyntheticFaces`` source
    with the same seed and first_identity returns.

    Returns:
      images_a, images_b: uint8 (N, S, S, 3); issame: bool (N,).
    """
    if num_pairs < 2 or num_pairs % 2:
        raise ValueError(f"num_pairs must be even and >= 2, got {num_pairs}")
    if num_identities < 2 or images_per_identity < 2:
        raise ValueError(
            f"need num_identities >= 2 and images_per_identity >= 2, got "
            f"{num_identities=}, {images_per_identity=}"
        )
    rng = np.random.default_rng([seed, _PAIR_STREAM, first_identity])
    issame = np.arange(num_pairs) % 2 == 0
    images_a = np.empty((num_pairs, image_size, image_size, 3), np.uint8)
    images_b = np.empty_like(images_a)
    for n, same in enumerate(issame):
        first = int(rng.integers(num_identities))
        if same:
            second = first
            image_1, image_2 = rng.choice(images_per_identity, size=2, replace=False)
        else:
            second = (first + 1 + int(rng.integers(num_identities - 1))) % num_identities
            image_1, image_2 = rng.integers(images_per_identity, size=2)
        images_a[n] = render_identity_image(first_identity + first, int(image_1), image_size, seed)
        images_b[n] = render_identity_image(first_identity + second, int(image_2), image_size, seed)
    return images_a, images_b, issame
