"""Verification on held-out synthetic identities, at full and at low resolution.

The pairs come from identities disjoint from the training ones; the low-resolution variants
degrade both images of every pair to N x N pixels and back (`degrade.to_resolution`), the
target-resolution setting of surveillance probes.
"""

import numpy as np

from facemoe_jax.data import degrade, synthetic
from facemoe_jax.evaluate import embed, verification


def parse_resolutions(spec: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise ValueError(
            f"config.eval.low_resolutions={spec!r} is not a comma list of pixel sizes"
        ) from None
    if any(v < 1 for v in values):
        raise ValueError(f"config.eval.low_resolutions={spec!r} has a size below 1 pixel")
    return values


def synthetic_verification(model, variables, config) -> dict[str, dict[str, float]]:
    """{"synthetic": metrics, "synthetic@8px": metrics, ...} for config.eval's pair set."""
    if config.eval.synthetic_pairs <= 0:
        return {}
    images_a, images_b, issame = synthetic.verification_pairs(
        num_pairs=config.eval.synthetic_pairs,
        image_size=config.model.image_size,
        seed=config.seed,
    )
    embed_fn = embed.make_embed_fn(model, flip_test=config.eval.flip_test)
    results = {}
    variants = [("synthetic", None)] + [
        (f"synthetic@{px}px", px) for px in parse_resolutions(config.eval.low_resolutions)
    ]
    for name, pixels in variants:
        a, b = images_a, images_b
        if pixels is not None:
            a = np.stack([degrade.to_resolution(im, pixels) for im in a])
            b = np.stack([degrade.to_resolution(im, pixels) for im in b])
        emb_a = embed.embed_images(embed_fn, variables, a, config.eval.batch_size)
        emb_b = embed.embed_images(embed_fn, variables, b, config.eval.batch_size)
        metrics = verification.verification_metrics(emb_a, emb_b, issame)
        results[name] = {k: float(v) for k, v in metrics.items()}
    return results
