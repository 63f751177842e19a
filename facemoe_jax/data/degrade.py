"""Image degradations on uint8 HWC RGB arrays: target-resolution evaluation and LR augmentation.

Low-resolution face recognition trains and evaluates on faces that were captured small and then
resized to the network's input size. ``to_resolution`` reproduces that for evaluation (a fixed
number of pixels); ``random_low_resolution`` is the official FaceMoE training augmentation (a
random size and random interpolations, so the model does not learn one resampling kernel's
fingerprint). All functions take and return uint8 (H, W, 3) arrays and draw randomness only from
the ``np.random.Generator`` they are given, so a grain ``random_map`` makes them reproducible
per record.
"""

from __future__ import annotations

import cv2
import numpy as np

# The five interpolations the official augmentation draws from, uniformly.
LOW_RESOLUTION_INTERPOLATIONS = (
    cv2.INTER_NEAREST,
    cv2.INTER_LINEAR,
    cv2.INTER_AREA,
    cv2.INTER_CUBIC,
    cv2.INTER_LANCZOS4,
)


def _resize(image: np.ndarray, width: int, height: int, interpolation: int) -> np.ndarray:
    """cv2.resize that keeps a trailing channel axis of size 1 and the dtype."""
    resized = cv2.resize(image, (width, height), interpolation=interpolation)
    return resized.reshape(height, width, *image.shape[2:])


def to_resolution(
    image: np.ndarray,
    pixels: int,
    *,
    down_interpolation: int = cv2.INTER_AREA,
    up_interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """Resizes an (H, W, C) image down to pixels x pixels and back up to (H, W).

    This is evaluation's target-resolution mode: the output has the input's shape and dtype but
    only the information of a ``pixels``-sided image. Area averaging for the way down avoids
    aliasing (like a real small sensor); bilinear for the way up is what a pipeline that
    resizes to the network input would do.

    Raises:
      ValueError: if ``pixels`` < 1.
    """
    if pixels < 1:
        raise ValueError(f"pixels must be >= 1, got {pixels}")
    height, width = image.shape[:2]
    small = _resize(image, int(pixels), int(pixels), down_interpolation)
    return _resize(small, width, height, up_interpolation)


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirrors an (H, W, C) image left-right with probability ``p`` (draws one uniform)."""
    if rng.random() < p:
        return np.ascontiguousarray(image[:, ::-1])
    return image


def random_low_resolution(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    p: float,
    min_ratio: float,
    max_ratio: float,
) -> np.ndarray:
    """With probability ``p``, shrinks the side to U(min_ratio, max_ratio) of itself and back.

    Each of the two resizes uses an interpolation drawn uniformly from nearest, bilinear, area,
    bicubic and Lanczos-4 (the official FaceMoE low-resolution augmentation; FaceMoE uses
    p=0.2, ratios 0.2..1.0). The small side is at least one pixel. Returns the input unchanged
    (same object) when not applied. Always draws one uniform first, so the random stream's
    position after the call depends only on whether it was applied.
    """
    if not 0.0 < min_ratio <= max_ratio:
        raise ValueError(f"need 0 < min_ratio <= max_ratio, got {min_ratio=}, {max_ratio=}")
    if rng.random() >= p:
        return image
    height, width = image.shape[:2]
    ratio = rng.uniform(min_ratio, max_ratio)
    down, up = rng.choice(LOW_RESOLUTION_INTERPOLATIONS, size=2)
    small_w = max(1, int(round(width * ratio)))
    small_h = max(1, int(round(height * ratio)))
    small = _resize(image, small_w, small_h, int(down))
    return _resize(small, width, height, int(up))
