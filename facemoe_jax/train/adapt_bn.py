"""Test-time BatchNorm adaptation: the encoder's BatchNorm statistics from the target images.

The adaptation half of adaptable instance-relation distillation (arXiv 2409.02049: "adaptive
batch normalisation", FaceBN in secondary summaries): at inference the student adapts to the
target domain through its BatchNorm layers alone, from unlabelled images, with no extra
components. Two modes (`config.eval.adapt_bn`, `FaceEncoder.adapt`):

  "cumulative": before a set of images is embedded, every BatchNorm layer's running mean and
      variance are replaced by the average, over the set's first N batches (weighted by their
      image counts), of that layer's statistics on each batch; then the set is embedded in
      eval mode with those statistics (AdaBN; PyTorch's `momentum=None` cumulative average).
  "per_batch": every batch is normalised with its own statistics (online batch statistics).

In both, a batch's statistics are those of a forward pass in which *every* BatchNorm normalises
with the current batch's statistics (as in training), while everything else stays in eval mode:
no dropout, no stochastic depth, the same parameters. Only `batch_stats` changes; every
parameter is the same array. Variances are the biased batch variances (Flax's convention).

The mechanism is model-independent: a Flax method interceptor replaces each `nn.BatchNorm` call
by batch-statistics normalisation with the layer's own scale and bias, and records the
statistics under the layer's `batch_stats` path. Padded rows of the last batch are weighted 0.
The CNNs have BatchNorm everywhere; the ViT and the Swin in their embedding heads; an imported
ONNX graph whose BatchNorms were folded into its convolutions none, unless
`config.model.onnx_batchnorm` puts them back (nn.BatchNorm layers, calibrated by
train/calibrate_bn.py, which reuses this interceptor with `pass_through`).

What a "set" is in the evaluation suite: every array of images the suite embeds on its own (one
side of a verification pair set, a degraded probe set of the resolution sweep, the probes, the
gallery and the HR probes of the TinyFace-like protocol, an IJB or TinyFace file list).
"""

from __future__ import annotations

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.core.images import normalize_images
from facemoe_jax.data.pipeline import eval_batches

MODES = ("off", "cumulative", "per_batch")


def check_config(eval_cfg) -> None:
    mode = eval_cfg.adapt_bn
    if mode not in MODES:
        raise ValueError(f"config.eval.adapt_bn={mode!r} is not one of {MODES}")
    batches = eval_cfg.adapt_bn_batches
    if mode == "cumulative" and batches < 1:
        raise ValueError(f"config.eval.adapt_bn_batches={batches} must be >= 1")


def _batch_statistics_interceptor(weights: jax.Array, pass_through: bool = False):
    """Every nn.BatchNorm normalises with the (weighted) statistics of the current batch and
    stores them as its batch_stats (mean, var); every other call runs unchanged.

    pass_through: the layer only records the statistics of its input and returns that input
    unchanged (calibration, train/calibrate_bn.py: the statistics of the network without its
    BatchNorms, whatever their current values)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        x = args[0]
        feature_axes = {a % x.ndim for a in np.atleast_1d(module.axis)}
        reduced = tuple(a for a in range(x.ndim) if a not in feature_axes)
        xf = x.astype(jnp.float32)
        w = jnp.broadcast_to(weights.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
        w = w.astype(jnp.float32)
        count = jnp.sum(w, axis=reduced)
        mean = jnp.sum(w * xf, axis=reduced) / count
        shape = [1 if a in reduced else x.shape[a] for a in range(x.ndim)]
        centred = xf - mean.reshape(shape)
        var = jnp.sum(w * centred * centred, axis=reduced) / count
        if module.is_mutable_collection("batch_stats"):
            module.put_variable("batch_stats", "mean", mean)
            module.put_variable("batch_stats", "var", var)
        if pass_through:
            return x
        y = centred * jax.lax.rsqrt(var + module.epsilon).reshape(shape)
        if module.use_scale:
            y = y * module.get_variable("params", "scale").astype(jnp.float32).reshape(shape)
        if module.use_bias:
            y = y + module.get_variable("params", "bias").astype(jnp.float32).reshape(shape)
        return y.astype(module.dtype if module.dtype is not None else x.dtype)

    return interceptor


def forward_with_batch_statistics(model, variables, images, weights=None, pass_through=False):
    """uint8 images (B, H, W, 3) -> (raw float32 embeddings, batch_stats of this batch), every
    BatchNorm normalising with the batch's statistics (rows weighted by `weights`, default 1);
    with `pass_through`, every BatchNorm the identity (its input's statistics recorded)."""
    if weights is None:
        weights = jnp.ones((images.shape[0],), jnp.float32)
    with nn.intercept_methods(_batch_statistics_interceptor(weights, pass_through)):
        (embeddings, _), mutated = model.apply(
            variables, normalize_images(images), train=False, mutable=["batch_stats"]
        )
    return embeddings.astype(jnp.float32), mutated.get("batch_stats", {})


def _weighted_batches(images, batch_size):
    for batch, valid in eval_batches(images, batch_size):
        yield batch, valid, (np.arange(len(batch)) < valid).astype(np.float32)


def average_statistics(statistics, variables, images, batch_size: int) -> dict:
    """The batch_stats tree `statistics(variables, batch, weights)` gives per batch, averaged
    over the batches of `images` weighted by their image counts (float64)."""
    if len(images) == 0:
        raise ValueError("BatchNorm adaptation needs at least one image")
    total, count = None, 0
    for batch, valid, weights in _weighted_batches(np.asarray(images), batch_size):
        stats = statistics(variables, batch, weights)
        scaled = jax.tree.map(lambda s, n=valid: np.asarray(s, np.float64) * n, stats)
        total = scaled if total is None else jax.tree.map(np.add, total, scaled)
        count += valid
    return jax.tree.map(lambda s: s / count, total)


def with_statistics(variables: dict, statistics: dict) -> dict:
    """`variables` whose batch_stats entries in `statistics` are replaced (in their dtype,
    float32 for new ones); the others kept, e.g. the statistics of an ONNX graph's own
    BatchNormalization nodes, which run as graph operators, not as nn.BatchNorm."""
    flat = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
    for path, value in traverse_util.flatten_dict(dict(statistics)).items():
        dtype = np.asarray(flat[path]).dtype if path in flat else np.float32
        flat[path] = np.asarray(value, dtype)
    return {**variables, "batch_stats": traverse_util.unflatten_dict(flat)}


class BatchNormAdaptation:
    """The jitted pieces of one mode for one model (compiled once per batch shape)."""

    def __init__(
        self, model, mode: str = "cumulative", num_batches: int = 8, flip_test: bool = True
    ):
        if mode not in MODES[1:]:
            raise ValueError(f"BatchNorm adaptation mode {mode!r} is not one of {MODES[1:]}")
        self.mode, self.num_batches, self.flip_test = mode, int(num_batches), flip_test

        def statistics(variables, images, weights):
            return forward_with_batch_statistics(model, variables, images, weights)[1]

        def embed(variables, images, weights, flip):
            emb = forward_with_batch_statistics(model, variables, images, weights)[0]
            if flip:
                flipped = images[:, :, ::-1]
                emb = emb + forward_with_batch_statistics(model, variables, flipped, weights)[0]
            return emb

        self._statistics = jax.jit(statistics)
        self._embed = jax.jit(embed, static_argnums=3)

    def adapted_variables(self, variables, images, batch_size: int, num_batches=None) -> dict:
        """`variables` with every BatchNorm's statistics re-estimated on `images`: the first
        `num_batches` batches (None: this adaptation's number; 0: all). The cumulative mode."""
        if not jax.tree.leaves(variables.get("batch_stats", {})):
            return variables  # no BatchNorm layer: nothing to adapt
        limit = self.num_batches if num_batches is None else num_batches
        images = np.asarray(images)[: limit * batch_size] if limit else np.asarray(images)
        averaged = average_statistics(self._statistics, variables, images, batch_size)
        return with_statistics(variables, averaged)

    def embed_per_batch(
        self, variables, images, batch_size: int, progress=None, flip_test: bool | None = None
    ) -> np.ndarray:
        """(N, D) raw embeddings, each batch normalised with its own statistics."""
        flip = self.flip_test if flip_test is None else bool(flip_test)
        out = []
        for batch, valid, weights in _weighted_batches(np.asarray(images), batch_size):
            out.append(np.asarray(self._embed(variables, batch, weights, flip))[:valid])
            if progress is not None:
                progress.update(valid)
        return np.concatenate(out)


def from_eval_config(model, eval_cfg) -> BatchNormAdaptation | None:
    """The adaptation config.eval asks for, or None ("off")."""
    check_config(eval_cfg)
    mode = eval_cfg.adapt_bn
    if mode == "off":
        return None
    return BatchNormAdaptation(model, mode, eval_cfg.adapt_bn_batches, eval_cfg.flip_test)
