"""Evaluation batches capped by the compiled memory of the embedding forward."""

import numpy as np

from facemoe_jax.evaluate import embed


def test_batch_shrinks_to_the_memory_budget_with_the_same_embeddings(tiny_model):
    _, model, variables = tiny_model
    images = np.random.default_rng(0).integers(0, 256, (12, 48, 48, 3), dtype=np.uint8)
    embed_fn = embed.make_embed_fn(model)
    full = embed_fn.batch_bytes(variables, (8, 48, 48, 3))
    assert full > 0
    # A budget that holds about a quarter of the batch-8 forward: the batch shrinks to fit.
    size = embed_fn.fit_batch_size(variables, (48, 48, 3), 8, budget=full // 4)
    assert 1 <= size < 8
    assert embed_fn.batch_bytes(variables, (size, 48, 48, 3)) <= full // 4
    assert embed_fn.fit_batch_size(variables, (48, 48, 3), 8, budget=full) == 8
    reference = embed.embed_images(embed_fn, variables, images, 8)
    small = embed.make_embed_fn(model)
    small._fits[((48, 48, 3), 8, None)] = size  # as if memory_budget() had been that small
    np.testing.assert_allclose(
        embed.embed_images(small, variables, images, 8), reference, rtol=1e-5, atol=1e-5
    )
