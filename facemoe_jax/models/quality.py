"""Per-image quality `a` for PETALface's quality-mixed adapters, with no download.

PETALface scores each image with a frozen off-the-shelf IQA network (pyiqa BRISQUE or CNNIQA) and
maps the score to `a = 0.5 + (score - threshold)` (no clipping, no gradient). Those networks are
downloads; the built-in estimator here is our own no-reference measure of *effective
resolution*, which is what separates a distant capture from an enrolment photo:

  sharpness: the face is area-resized to 48 x 48 (so the score does not depend on the input
  size), converted to grey, and the share of its variance above a 3 x 3 box blur is taken:
  r = mean((g - box(g))^2) / var(g). Upscaled low-resolution captures have almost no energy
  there, sharp faces a lot. score = clip((log r - LOG_LOW) / (LOG_HIGH - LOG_LOW), 0, 1), with
  LOG_LOW / LOG_HIGH the medians of log r over synthetic faces captured at 8-16 px
  (`degrade.acquisition_low_resolution`) and at full resolution (fitted once, 2026-11-23:
  see tests/models/test_quality.py), so 0 ~ a typical LR capture, 1 ~ a typical HR face.

`a = 0.5 + sign * (score - threshold)`: sign +1 (a "higher is better" score, CNNIQA's
convention: HR images weigh adapter 2) or -1 (BRISQUE's "lower is better": HR weighs adapter 1).
Any JAX function `images in [-1, 1] (B, H, W, 3) -> (B,)` can replace the built-in
(`config.model.lora.quality = "package.module:function"`), and so can the quality head of a
trained recognizability model (`config.model.lora.quality = "recognizability:WORKDIR"`, a
workdir of `configs/recognizability.py` or any run with `config.model.quality_head`): its
predicted recognizability in (0, 1), higher = more recognisable, so sign +1.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from facemoe_jax.models.recognizability import has_quality_head, head_quality

CANONICAL_SIZE = 48
LOG_LOW = -7.0  # median log r of synthetic faces captured at 8-16 px
LOG_HIGH = -2.8  # median log r of the same faces at full resolution


def sharpness_score(images: jax.Array) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] -> (B,) float32 in [0, 1]; higher = sharper."""
    x = images.astype(jnp.float32)
    b = x.shape[0]
    if x.shape[1:3] != (CANONICAL_SIZE, CANONICAL_SIZE):
        x = jax.image.resize(x, (b, CANONICAL_SIZE, CANONICAL_SIZE, 3), "linear", antialias=True)
    grey = x.mean(axis=-1)
    padded = jnp.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    shifted = [
        padded[:, i : i + CANONICAL_SIZE, j : j + CANONICAL_SIZE]
        for i in range(3)
        for j in range(3)
    ]
    box = sum(shifted) / 9.0
    high = jnp.mean((grey - box) ** 2, axis=(1, 2))
    ratio = high / (jnp.var(grey, axis=(1, 2)) + 1e-6)
    score = (jnp.log(ratio + 1e-12) - LOG_LOW) / (LOG_HIGH - LOG_LOW)
    return jnp.clip(score, 0.0, 1.0)


ESTIMATORS = {"sharpness": sharpness_score}
RECOGNIZABILITY = "recognizability:"  # + a workdir: a trained quality head as the estimator
# prefix -> factory(rest of the name) -> estimator: estimators that load a model, which is done
# above models/ (interop/load.py registers RECOGNIZABILITY).
_PREFIXES: dict[str, Callable[[str], Callable]] = {}


def register_estimator_prefix(prefix: str, factory: Callable[[str], Callable]) -> None:
    """`config.model.lora.quality = prefix + REST` resolves to `factory(REST)`; the factory's
    ValueErrors should name the field."""
    _PREFIXES[prefix] = factory


def recognizability_score(encoder):
    """A FaceEncoder's quality head as an estimator: (B, H, W, 3) in [-1, 1], any size ->
    (B,) float32 in (0, 1), what `FaceEncoder.quality` returns for the same faces (the mean of
    the face and its mirror image); faces of another size are first resized to its input."""
    return head_score(encoder.model, encoder.variables, encoder.image_size)


def head_score(model, variables: dict, size: int):
    """`recognizability_score` of a model, its {"params", "batch_stats"} and input size."""
    if not has_quality_head(model):
        raise ValueError("the model has no quality head (config.model.quality_head=False)")

    def score(images):
        x = images.astype(jnp.float32)
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), "linear", antialias=True)
        return head_quality(model, variables, x)

    return score


def estimator(name: str):
    """A built-in name, a registered prefix ("recognizability:WORKDIR") or
    "package.module:function"; errors name the config field."""
    if name in ESTIMATORS:
        return ESTIMATORS[name]
    for prefix, factory in _PREFIXES.items():
        if name.startswith(prefix):
            return factory(name[len(prefix) :])
    if name.startswith(RECOGNIZABILITY):
        raise ValueError(
            f"config.model.lora.quality={name!r}: nothing resolves {RECOGNIZABILITY!r} in this "
            "process (importing facemoe_jax.interop.load registers it)"
        )
    module, _, function = name.partition(":")
    if not module or not function:
        raise ValueError(
            f"config.model.lora.quality={name!r} is neither one of {sorted(ESTIMATORS)}, "
            f"'{RECOGNIZABILITY}WORKDIR' nor 'package.module:function'"
        )
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        prefixes = f" (known prefixes: {sorted(_PREFIXES)})" if _PREFIXES else ""
        raise ValueError(
            f"config.model.lora.quality={name!r} cannot be loaded: {e}{prefixes}"
        ) from None


def quality_mix_value(images, name: str = "sharpness", threshold: float = 0.5, sign: float = 1.0):
    """PETALface's `a = 0.5 + sign * (score - threshold)` per image, without gradient."""
    score = jax.lax.stop_gradient(estimator(name)(images)).astype(jnp.float32)
    return 0.5 + sign * (score - threshold)


@dataclasses.dataclass(frozen=True)
class QualitySettings:
    """Where a model gets `a` when the caller passes none (config.model.lora.quality*)."""

    estimator: str = "sharpness"
    threshold: float = 0.5
    sign: float = 1.0

    def resolve(self, images, quality, lora):
        """The per-image `a` a quality-mixed model needs, (B,) float32; None when it needs none."""
        if lora is None or not lora.quality_mix:
            return None
        if quality is not None:
            return jnp.asarray(quality, jnp.float32).reshape(images.shape[0])
        return quality_mix_value(images, self.estimator, self.threshold, self.sign)
