"""Image degradations on uint8 HWC RGB arrays: target-resolution evaluation and LR augmentation.

Low-resolution face recognition trains and evaluates on faces that were captured small and then
resized to the network's input size. ``to_resolution`` reproduces that for evaluation (a fixed
number of pixels); ``random_low_resolution`` is the official FaceMoE training augmentation (a
random size and random interpolations, so the model does not learn one resampling kernel's
fingerprint).

The official FaceMoE set is ``crop_with_zero_pad``, ``random_low_resolution``,
``photometric_jitter`` and ``horizontal_flip``. Beyond it, for surveillance imagery:
``gaussian_blur`` (defocus), ``motion_blur``, ``sensor_noise``, ``jpeg_recompress``,
``grayscale`` (IR / monochrome cameras) and ``random_target_resolution`` (exactly N pixels).

Conventions: every random function is ``f(image, rng, *, p, ...)``: it draws one uniform first
and returns the input itself (same object) when not applied, so a record's random stream is a
pure function of its seed. Inputs and outputs are uint8 (H, W, 3) of the same shape; nothing
writes into its input (cached source images are read-only). ``augment.py`` composes them.
"""

from __future__ import annotations

import math

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


def _flip_left_right(image: np.ndarray) -> np.ndarray:
    """image[:, ::-1] as a new contiguous array (cv2.flip: ~10x faster than numpy's copy)."""
    if image.ndim == 3 and image.shape[2] <= 4:
        return cv2.flip(image, 1)
    return np.ascontiguousarray(image[:, ::-1])


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirrors an (H, W, C) image left-right with probability ``p`` (draws one uniform)."""
    if rng.random() < p:
        return _flip_left_right(image)
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
    # = rng.choice(LOW_RESOLUTION_INTERPOLATIONS, size=2) (the same draws), 4x cheaper.
    down, up = (
        LOW_RESOLUTION_INTERPOLATIONS[k]
        for k in rng.integers(0, len(LOW_RESOLUTION_INTERPOLATIONS), size=2)
    )
    small_w = max(1, round(width * ratio))
    small_h = max(1, round(height * ratio))
    small = _resize(image, small_w, small_h, int(down))
    return _resize(small, width, height, int(up))


def _applies(rng: np.random.Generator, p: float) -> bool:
    return rng.random() < p


def _gray(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) as float32 (H, W, 1)."""
    return (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def crop_with_zero_pad(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    p: float,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """With probability ``p``, keeps a random-resized-crop box in place and blacks out the rest.

    The box is drawn as torchvision's ``RandomResizedCrop`` draws it (area share U(scale),
    log-uniform aspect ratio, up to 10 tries, else the whole image), then pasted back at its
    own position on a black canvas: the official FaceMoE "crop with zero padding", which
    teaches the model partially visible faces without changing their scale.
    """
    if not _applies(rng, p):
        return image
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))  # math: scalar calls ~5x cheaper
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            out = np.zeros_like(image)
            out[top : top + h, left : left + w] = image[top : top + h, left : left + w]
            return out
    return image


def photometric_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    p: float,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
) -> np.ndarray:
    """With probability ``p``, brightness, contrast and saturation jitter in a random order.

    Each factor is U(max(0, 1 - s), 1 + s) and each operation blends with a reference image as
    torchvision's ColorJitter does: black (brightness), the mean grey level (contrast), the
    grey image (saturation); the result is rounded and clipped to uint8 after each operation.
    """
    if not _applies(rng, p):
        return image
    strengths = (brightness, contrast, saturation)
    factors = [rng.uniform(max(0.0, 1 - s), 1 + s) for s in strengths]
    out = image
    # uint8 OpenCV blends (saturating, round-to-nearest-even like np.rint): 5-10x faster than
    # float numpy on a 120 px face; the grey reference is rounded to uint8 first (< 0.5 level).
    for op in rng.permutation(3):
        factor = float(factors[op])
        if op == 0:
            out = cv2.convertScaleAbs(out, alpha=factor)
        else:
            gray = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
            if op == 1:
                shift = (1 - factor) * float(np.rint(gray.mean()))
                out = cv2.addWeighted(out, factor, out, 0.0, shift)
            else:
                gray3 = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
                out = cv2.addWeighted(out, factor, gray3, 1 - factor, 0.0)
    return out


def gaussian_blur(
    image: np.ndarray, rng: np.random.Generator, *, p: float, max_sigma: float = 2.0
) -> np.ndarray:
    """With probability ``p``, a Gaussian blur with sigma U(0.5, max_sigma) pixels (defocus)."""
    if not _applies(rng, p):
        return image
    sigma = rng.uniform(0.5, max(0.5, max_sigma))
    size = 2 * int(np.ceil(3 * sigma)) + 1
    return cv2.GaussianBlur(image, (size, size), sigma, borderType=cv2.BORDER_REFLECT_101)


def motion_kernel(length: int, angle_degrees: float) -> np.ndarray:
    """A normalised (length, length) line kernel through the centre at the given angle."""
    kernel = np.zeros((length, length), np.float32)
    centre = (length - 1) / 2
    dx, dy = np.cos(np.deg2rad(angle_degrees)), np.sin(np.deg2rad(angle_degrees))
    for t in np.linspace(-centre, centre, 4 * length):
        kernel[round(centre + t * dy), round(centre + t * dx)] = 1.0
    return kernel / kernel.sum()


def motion_blur(
    image: np.ndarray, rng: np.random.Generator, *, p: float, max_length: int = 9
) -> np.ndarray:
    """With probability ``p``, a linear motion blur: length 3..max_length px, uniform angle."""
    if not _applies(rng, p):
        return image
    length = int(rng.integers(3, max(3, max_length) + 1))
    kernel = motion_kernel(length, rng.uniform(0.0, 180.0))
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def sensor_noise(
    image: np.ndarray, rng: np.random.Generator, *, p: float, max_sigma: float = 10.0
) -> np.ndarray:
    """With probability ``p``, additive Gaussian noise, sigma U(1, max_sigma) grey levels.

    Independent per pixel and channel (read noise of a small sensor, amplified by gain).
    """
    if not _applies(rng, p):
        return image
    sigma = rng.uniform(1.0, max(1.0, max_sigma))
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return _to_uint8(image + noise)


def jpeg_recompress(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    p: float,
    min_quality: int = 10,
    max_quality: int = 60,
) -> np.ndarray:
    """With probability ``p``, JPEG-encodes at quality U{min..max} and decodes again."""
    if not _applies(rng, p):
        return image
    quality = int(rng.integers(min_quality, max_quality + 1))
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV failed to JPEG-encode an image of shape {image.shape}")
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def grayscale(image: np.ndarray, rng: np.random.Generator, *, p: float) -> np.ndarray:
    """With probability ``p``, the luma replicated into three channels (monochrome camera)."""
    if not _applies(rng, p):
        return image
    return np.repeat(_to_uint8(_gray(image)), 3, axis=-1)


def random_target_resolution(
    image: np.ndarray, rng: np.random.Generator, *, p: float, pixels: tuple[int, ...]
) -> np.ndarray:
    """With probability ``p``, ``to_resolution`` at a size drawn uniformly from ``pixels``."""
    if not _applies(rng, p):
        return image
    return to_resolution(image, int(pixels[int(rng.integers(len(pixels)))]))


def acquisition_low_resolution(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    min_pixels: int = 8,
    max_pixels: int = 16,
    max_blur: float = 0.5,
    max_noise_sigma: float = 6.0,
    jpeg_quality: tuple[int, int] = (30, 80),
) -> np.ndarray:
    """A face as a distant camera captures it, resized back to the input size (always applied).

    Unlike a clean resize (``to_resolution``), every step happens where a camera does it:
      1. optics: Gaussian blur, sigma U(0, max_blur) *low-resolution* pixels (scaled to the
         input grid), on top of the sensor's own area integration;
      2. sensor: area-average to P x P pixels, P uniform in {min_pixels .. max_pixels};
      3. read noise at the small size, sigma U(0, max_noise_sigma) grey levels per pixel and
         channel (so one noisy sensor pixel covers many input pixels after upscaling);
      4. compression: JPEG at quality U{jpeg_quality} of the P x P image (blocking at that size);
      5. bilinear resize back to the input, as a pipeline feeding the network does.
    Draws, in order: P, blur, noise sigma, the noise field, the JPEG quality.
    """
    if not 1 <= min_pixels <= max_pixels:
        raise ValueError(
            f"need 1 <= acquisition min_pixels ({min_pixels}) <= max_pixels ({max_pixels})"
        )
    low, high = (int(q) for q in jpeg_quality)
    if not 1 <= low <= high <= 100:
        raise ValueError(f"acquisition JPEG quality range {jpeg_quality} must lie in 1..100")
    height, width = image.shape[:2]
    pixels = int(rng.integers(min_pixels, max_pixels + 1))
    sigma = rng.uniform(0.0, max(0.0, max_blur)) * width / pixels
    if sigma > 0.05:
        size = 2 * int(np.ceil(3 * sigma)) + 1
        image = cv2.GaussianBlur(image, (size, size), sigma, borderType=cv2.BORDER_REFLECT_101)
    small = _resize(image, pixels, pixels, cv2.INTER_AREA)
    noise_sigma = np.float32(rng.uniform(0.0, max(0.0, max_noise_sigma)))
    small = _to_uint8(small + rng.standard_normal(small.shape, dtype=np.float32) * noise_sigma)
    quality = int(rng.integers(low, high + 1))
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError(f"OpenCV failed to JPEG-encode an image of shape {small.shape}")
    small = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return _resize(small, width, height, cv2.INTER_LINEAR)


def random_acquisition(
    image: np.ndarray, rng: np.random.Generator, *, p: float, **settings
) -> np.ndarray:
    """With probability ``p``, ``acquisition_low_resolution(image, rng, **settings)``: the
    capture as a training augmentation (a fresh capture each time the record is read)."""
    if not _applies(rng, p):
        return image
    return acquisition_low_resolution(image, rng, **settings)


def acquisition_settings(data_cfg) -> dict:
    """Keyword arguments of ``acquisition_low_resolution`` from ``config.data.acquisition_*``."""
    text = str(data_cfg.acquisition_jpeg_quality)
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"config.data.acquisition_jpeg_quality={text!r} is not 'MIN,MAX' (e.g. '30,80')"
        ) from None
    if not 1 <= low <= high <= 100:
        raise ValueError(
            f"config.data.acquisition_jpeg_quality={text!r} must be MIN,MAX with "
            "1 <= MIN <= MAX <= 100"
        )
    low_px, high_px = int(data_cfg.acquisition_min_pixels), int(data_cfg.acquisition_max_pixels)
    if not 1 <= low_px <= high_px:
        raise ValueError(
            f"need 1 <= config.data.acquisition_min_pixels ({low_px}) <= "
            f"config.data.acquisition_max_pixels ({high_px})"
        )
    for field in ("acquisition_blur", "acquisition_noise_sigma"):
        if data_cfg[field] < 0:
            raise ValueError(f"config.data.{field}={data_cfg[field]} must be >= 0")
    return dict(
        min_pixels=low_px,
        max_pixels=high_px,
        max_blur=float(data_cfg.acquisition_blur),
        max_noise_sigma=float(data_cfg.acquisition_noise_sigma),
        jpeg_quality=(low, high),
    )
