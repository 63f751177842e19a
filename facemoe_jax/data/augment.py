"""The training augmentation built from ``config.data``: geometry first, then degradations.

``Augmenter(data_cfg)(image, rng)`` runs, in this order, each step with its own probability
(0 switches a step off; it then draws nothing):

  geometry (shared by HR and LR):  crop_with_zero_pad -> horizontal_flip
  degradations (LR only):          photometric_jitter -> gaussian_blur -> motion_blur
                                   -> random_low_resolution -> random_target_resolution
                                   -> random_acquisition (blur, small sensor, noise, JPEG)
                                   -> sensor_noise -> jpeg_recompress -> grayscale

The order follows a camera: optics and motion blur the scene, the sensor samples it small and
adds noise, the encoder compresses. Colour jitter is photometric nuisance, so it sits with the
degradations: in *paired* mode (``paired=True``) the augmenter returns
``{"image": LR, "image_hr": HR}`` where HR is the geometry-only image and LR is HR degraded,
so a distillation teacher sees exactly the clean version of the student's input.

The official FaceMoE recipe is ``crop_prob = low_res_prob = photometric_prob = 0.2``,
``flip_prob = 0.5`` and everything else 0 (``official_augmentation`` sets it).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from facemoe_jax.data import degrade


def official_augmentation(data_cfg: ml_collections.ConfigDict) -> None:
    """Sets the official FaceMoE probabilities and ranges on ``data_cfg`` in place."""
    data_cfg.update(
        crop_prob=0.2,
        crop_min_scale=0.2,
        flip_prob=0.5,
        photometric_prob=0.2,
        photometric_strength=0.5,
        low_res_prob=0.2,
        low_res_min_ratio=0.2,
        low_res_max_ratio=1.0,
    )


def _resolutions(text: str) -> tuple[int, ...]:
    try:
        pixels = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(
            f"config.data.target_resolutions={text!r} must be comma-separated integers"
        ) from None
    if not pixels or min(pixels) < 1:
        raise ValueError(f"config.data.target_resolutions={text!r} needs sizes >= 1")
    return pixels


class Augmenter:
    """Picklable ``(image, rng) -> image`` (or ``{"image", "image_hr"}`` when paired)."""

    def __init__(self, data_cfg: ml_collections.ConfigDict, paired: bool = False):
        c = data_cfg
        probabilities = {k: c[k] for k in c if k.endswith("_prob")}
        for name, value in probabilities.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"config.data.{name}={value} must be in [0, 1]")
        self.paired = paired
        self.crop = {"p": c.crop_prob, "scale": (c.crop_min_scale, 1.0)}
        self.flip_prob = c.flip_prob
        strength = c.photometric_strength
        self.photometric = {
            "p": c.photometric_prob,
            "brightness": strength,
            "contrast": strength,
            "saturation": strength,
        }
        self.gaussian_blur = {"p": c.gaussian_blur_prob, "max_sigma": c.gaussian_blur_max_sigma}
        self.motion_blur = {"p": c.motion_blur_prob, "max_length": c.motion_blur_max_length}
        self.low_res = {
            "p": c.low_res_prob,
            "min_ratio": c.low_res_min_ratio,
            "max_ratio": c.low_res_max_ratio,
        }
        self.target_res = {
            "p": c.target_res_prob,
            "pixels": _resolutions(c.target_resolutions) if c.target_res_prob > 0 else (1,),
        }
        self.noise = {"p": c.noise_prob, "max_sigma": c.noise_max_sigma}
        self.jpeg = {
            "p": c.jpeg_prob,
            "min_quality": c.jpeg_min_quality,
            "max_quality": c.jpeg_max_quality,
        }
        if not 1 <= c.jpeg_min_quality <= c.jpeg_max_quality <= 100:
            raise ValueError(
                f"need 1 <= config.data.jpeg_min_quality ({c.jpeg_min_quality}) <= "
                f"jpeg_max_quality ({c.jpeg_max_quality}) <= 100"
            )
        self.grayscale_prob = c.grayscale_prob
        acquisition_prob = c.acquisition_prob
        self.acquisition = {"p": acquisition_prob}
        if acquisition_prob > 0:
            self.acquisition.update(degrade.acquisition_settings(c))

        # Only steps that can apply are kept: a switched-off step costs nothing, not even a
        # draw, so e.g. flip-only keeps the random stream of the flip alone.
        self.geometry_steps = self._active(
            (degrade.crop_with_zero_pad, self.crop),
            (degrade.horizontal_flip, {"p": self.flip_prob}),
        )
        self.degrade_steps = self._active(
            (degrade.photometric_jitter, self.photometric),
            (degrade.gaussian_blur, self.gaussian_blur),
            (degrade.motion_blur, self.motion_blur),
            (degrade.random_low_resolution, self.low_res),
            (degrade.random_target_resolution, self.target_res),
            (degrade.random_acquisition, self.acquisition),
            (degrade.sensor_noise, self.noise),
            (degrade.jpeg_recompress, self.jpeg),
            (degrade.grayscale, {"p": self.grayscale_prob}),
        )

    @staticmethod
    def _active(*steps):
        return tuple((fn, kwargs) for fn, kwargs in steps if kwargs["p"] > 0)

    def geometry(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for fn, kwargs in self.geometry_steps:
            image = fn(image, rng, **kwargs)
        return image

    def degrade(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for fn, kwargs in self.degrade_steps:
            image = fn(image, rng, **kwargs)
        return image

    def __call__(self, image: np.ndarray, rng: np.random.Generator):
        high_res = self.geometry(image, rng)
        low_res = self.degrade(high_res, rng)
        if self.paired:
            return {"image": low_res, "image_hr": high_res}
        return low_res
