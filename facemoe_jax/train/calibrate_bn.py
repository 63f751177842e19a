"""Calibration of the BatchNorms inserted into an ONNX graph (`config.model.onnx_batchnorm`).

Why: an exported recognizer such as ../shared/realfaces' MobileFaceNet has its BatchNorms folded
into its convolutions, so test-time BatchNorm adaptation (train/adapt_bn.py) finds nothing to
adapt. `OnnxModel(batchnorm="every_conv")` puts an nn.BatchNorm back after every convolution;
this module sets each one to the identity at the statistics of its input on HR images:

  mean mu and variance var of the convolution's output per channel (over images and positions),
  scale = sqrt(var + eps), bias = mu, so BN(x) = (x - mu) / sqrt(var + eps) * scale + bias = x.

The calibrated model computes exactly the plain graph (to float rounding). Adaptation then
replaces (mu, var) by the target set's statistics (mu_t, var_t) and leaves scale and bias, so
each convolution's output becomes (x - mu_t) / sqrt(var_t + eps) * sqrt(var + eps) + mu: the
LR activations re-standardised to the HR statistics (AdaBN's alignment, Li et al. 2016).

Statistics: one forward pass per batch in which every BatchNorm is the identity and records the
weighted mean and biased variance of its input (adapt_bn.forward_with_batch_statistics with
`pass_through`), averaged over the batches by image count, the estimator the adaptation uses
(so an HR set adapted on itself gives the calibration statistics back, up to its sample).

Images: `config.model.onnx_batchnorm_images` training records (config.data.train with its
people file: the training people only), drawn without replacement with config.seed, decoded and
resized to the model input as the training pipeline does, with no augmentation and no
degradation (the HR view).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import traverse_util

from facemoe_jax.data.pipeline import BadRecordError, DecodeAndResize
from facemoe_jax.models.onnx_graph import BATCHNORM_EPSILON, OnnxModel, inserted_batchnorm_names
from facemoe_jax.train import adapt_bn


def hr_images(config, count: int, seed: int) -> np.ndarray:
    """uint8 (N, S, S, 3): up to `count` undegraded training images, drawn with `seed`."""
    from facemoe_jax.data import sources

    source = sources.open_source(config)
    size = int(config.model.image_size)
    decode = DecodeAndResize(size)
    order = np.random.default_rng(seed).permutation(len(source))
    images = []
    for index in order:  # in the drawn order, past unreadable records, until `count`
        if len(images) == count:
            break
        try:
            images.append(decode(source[int(index)])["image"])
        except BadRecordError:
            continue
    if not images:
        raise ValueError(
            f"config.model.onnx_batchnorm: no readable training image in {config.data.train!r} "
            "to calibrate the inserted BatchNorms on"
        )
    return np.stack(images)


def calibrated_variables(model, variables, images, batch_size: int, epsilon: float) -> dict:
    """`variables` with every nn.BatchNorm of `model` set to the identity at its input's
    statistics on `images` (the module docstring), whether the variables held the layer or
    not; every other variable unchanged."""

    @jax.jit
    def statistics(variables, images, weights):
        return adapt_bn.forward_with_batch_statistics(
            model, variables, images, weights, pass_through=True
        )[1]

    averaged = adapt_bn.average_statistics(statistics, variables, images, batch_size)
    # The layers' {mean, var}; the collection also returns other statistics as they were (an
    # ONNX graph's own BatchNormalization nodes: flat arrays, left alone).
    layers = {
        path: value
        for path, value in traverse_util.flatten_dict(dict(averaged)).items()
        if len(path) > 1 and path[-1] in ("mean", "var")
    }
    params = traverse_util.flatten_dict(dict(variables["params"]))
    for (*layer, kind), value in layers.items():
        if kind == "mean":
            params[(*layer, "bias")] = np.asarray(value, np.float32)
        else:
            params[(*layer, "scale")] = np.sqrt(value + epsilon).astype(np.float32)
    out = adapt_bn.with_statistics(variables, traverse_util.unflatten_dict(layers))
    return {**out, "params": traverse_util.unflatten_dict(params)}


def calibrate_if_needed(model, variables, config) -> dict:
    """`variables` ready for `model`: an OnnxModel with inserted BatchNorms whose variables lack
    them (an ONNX file, a run trained without them) gets them calibrated on HR training images;
    anything else is returned as it is (a run trained with them keeps its own)."""
    if not isinstance(model, OnnxModel) or model.batchnorm == "off":
        return variables
    names = inserted_batchnorm_names(model.graph)
    if all(name in variables.get("batch_stats", {}) for name in names):
        return variables
    t0 = time.perf_counter()
    count = int(config.model.onnx_batchnorm_images)
    images = hr_images(config, count, int(config.seed))
    out = calibrated_variables(
        model, variables, images, int(config.eval.batch_size), BATCHNORM_EPSILON
    )
    print(
        f"{len(names)} inserted BatchNorms calibrated to the identity on {len(images)} HR training "
        f"images in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return out
