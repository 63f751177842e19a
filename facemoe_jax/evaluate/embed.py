"""Embedding images with a trained encoder, with the flip test used by the field's evaluators.

`embed_images` / `embed_loaded` take an optional `facemoe_jax.progress.Progress` and count the
images into it batch by batch (the evaluation suite opens one per set: name, done/total, ETA).
"""

import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.data.pipeline import eval_batches, normalize_images


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

    return embed


def embed_images(
    embed_fn, variables, images: np.ndarray, batch_size: int, progress=None
) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, D) float32, in fixed-size (padded) batches: one compilation."""
    out = []
    for batch, num_valid in eval_batches(images, batch_size):
        out.append(np.asarray(embed_fn(variables, batch))[:num_valid])
        if progress is not None:
            progress.update(num_valid)
    return np.concatenate(out)


def embed_loaded(
    embed_fn, variables, load, count: int, batch_size: int, progress=None
) -> np.ndarray:
    """Embeds `count` images produced one at a time by `load(index)`, a batch at a time.

    For sets too large to hold as pixels (IJB-C's 469k faces, TinyFace's 153k distractors):
    only one batch of images and the (count, D) features are in memory.
    """
    out = []
    for start in range(0, count, batch_size):
        images = np.stack([load(i) for i in range(start, min(start + batch_size, count))])
        out.append(embed_images(embed_fn, variables, images, batch_size, progress))
    return np.concatenate(out)
