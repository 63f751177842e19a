"""Embedding images with a trained encoder, with the flip test used by the field's evaluators.

`embed_images` / `embed_loaded` take an optional `facemoe_jax.core.progress.Progress` and count the
images into it batch by batch (the evaluation suite opens one per set: name, done/total, ETA).

Bounded memory: the function `make_embed_fn` returns compiles ahead of time per batch shape, and
`embed_images` / `embed_loaded` shrink `config.eval.batch_size` to the largest batch whose
compiled forward (XLA `memory_analysis()`: temporaries, output and the images) fits in the memory
left on the device (`memory_budget`: free device memory, on CPU half the available RAM; or
$FACEMOE_EVAL_MEMORY_BYTES), so evaluation fits wherever training fit, with the same results.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.core.images import normalize_images
from facemoe_jax.data.pipeline import eval_batches


def make_embed_fn(model, flip_test: bool = True):
    """jit(variables, uint8 images (B, H, W, 3)) -> raw float32 embeddings (B, D).

    flip_test adds the raw embeddings of the image and its mirror image (insightface and the
    FaceMoE TinyFace script: `pre_norm_vector_add`); normalise afterwards.
    """

    @jax.jit
    def embed(variables, images):
        x = normalize_images(images)
        emb, _ = model.apply(variables, x, train=False)
        if flip_test:
            flipped, _ = model.apply(variables, x[:, :, ::-1], train=False)
            emb = emb + flipped
        return emb.astype(jnp.float32)

    return EmbedFn(embed)


def memory_budget() -> int:
    """Bytes an evaluation batch may use: $FACEMOE_EVAL_MEMORY_BYTES, else the free memory of
    device 0 (accelerators), else half of the host's available RAM (CPU)."""
    if os.environ.get("FACEMOE_EVAL_MEMORY_BYTES"):
        return int(float(os.environ["FACEMOE_EVAL_MEMORY_BYTES"]))
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        pass
    if stats and stats.get("bytes_limit"):
        return int(0.9 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] // 2
    except (OSError, KeyError, ValueError):
        return 8 << 30


class EmbedFn:
    """The jitted embedding, compiled ahead of time once per batch shape, with the compiled
    memory of each shape; callable as the jitted function."""

    def __init__(self, jitted):
        self._jitted = jitted
        self._compiled = {}
        self._fits = {}

    @property
    def jitted(self):
        """The jitted function itself (to lower for other shardings or devices)."""
        return self._jitted

    def compiled(self, variables, shape, dtype=np.uint8):
        if shape not in self._compiled:
            spec = jax.ShapeDtypeStruct(shape, dtype)
            self._compiled[shape] = self._jitted.lower(variables, spec).compile()
        return self._compiled[shape]

    def batch_bytes(self, variables, shape) -> int:
        """Memory one call at this batch shape needs beyond the variables already in memory."""
        memory = self.compiled(variables, shape).memory_analysis()
        if memory is None:
            return 0
        return int(memory.temp_size_in_bytes + memory.output_size_in_bytes + np.prod(shape))

    def fit_batch_size(self, variables, image_shape, batch_size: int, budget=None) -> int:
        """The largest batch <= batch_size whose compiled forward fits in `budget` bytes."""
        key = (tuple(image_shape), batch_size, budget)
        if key in self._fits:
            return self._fits[key]
        budget = memory_budget() if budget is None else budget
        size = batch_size
        while size > 1:
            need = self.batch_bytes(variables, (size, *image_shape))
            if need <= budget:
                break
            # Memory grows about linearly with the batch: jump close, then verify.
            size = max(1, min(size // 2, int(size * budget / need)))
        if size < batch_size:
            print(
                f"note: evaluation batch {batch_size} needs more than the {budget / 2**30:.1f} "
                f"GiB free; embedding in batches of {size}",
                flush=True,
            )
        self._fits[key] = size
        return size

    def __call__(self, variables, images):
        return self.compiled(variables, images.shape, images.dtype)(variables, images)


def embed_images(
    embed_fn, variables, images: np.ndarray, batch_size: int, progress=None, adaptation=None
) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, D) float32, in fixed-size (padded) batches: one compilation.

    The batch is `batch_size` or, for an `EmbedFn`, the largest smaller one that fits in memory.
    With a `train.adapt_bn.BatchNormAdaptation`, the set is embedded with BatchNorm statistics
    from these images ("cumulative") or from each batch ("per_batch").
    """
    if isinstance(embed_fn, EmbedFn):
        batch_size = embed_fn.fit_batch_size(variables, images.shape[1:], batch_size)
    if adaptation is not None:
        if adaptation.mode == "per_batch":
            return adaptation.embed_per_batch(variables, images, batch_size, progress)
        variables = adaptation.adapted_variables(variables, images, batch_size)
    out = []
    for batch, num_valid in eval_batches(images, batch_size):
        out.append(np.asarray(embed_fn(variables, batch))[:num_valid])
        if progress is not None:
            progress.update(num_valid)
    return np.concatenate(out)


def embed_loaded(
    embed_fn, variables, load, count: int, batch_size: int, progress=None, adaptation=None
) -> np.ndarray:
    """Embeds `count` images produced one at a time by `load(index)`, a batch at a time.

    For sets too large to hold as pixels (IJB-C's 469k faces, TinyFace's 153k distractors):
    only one batch of images and the (count, D) features are in memory. A "cumulative"
    `adaptation` estimates its statistics on the first `adaptation.num_batches` batches.
    """

    def batches():
        for start in range(0, count, batch_size):
            yield np.stack([load(i) for i in range(start, min(start + batch_size, count))])

    if adaptation is not None and adaptation.mode == "per_batch":
        return np.concatenate(
            [adaptation.embed_per_batch(variables, b, batch_size, progress) for b in batches()]
        )
    if adaptation is not None:
        sample = np.stack([load(i) for i in range(min(count, adaptation.num_batches * batch_size))])
        variables = adaptation.adapted_variables(variables, sample, batch_size)
    return np.concatenate(
        [embed_images(embed_fn, variables, b, batch_size, progress) for b in batches()]
    )
