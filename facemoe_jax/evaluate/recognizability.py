"""Evaluation of the recognizability heads (models/recognizability.py), run by suite.py.

- `make_quality_fn`: the quality head's score per image (mean of the image and its mirror image
  with the flip test), compiled ahead like the embedding (`embed.EmbedFn`).
- `pair_set_quality`: error-versus-reject of a verification set by the quality head beside the
  embedding norm and random rejection (quality.py), with the FNMR left after rejecting 20 %;
  once as the set is and once with its second faces degraded to mixed resolutions (the case a
  quality score is for: a stream of frames from unusable to sharp).
- `quality_identity_set`: the same on many more pairs than a verification set holds: every
  same-identity pair of held-out identities with several images each (`identity_pairs`) and as
  many different-identity pairs, each image embedded once (config.eval.quality_identities).
- `quality_vs_resolution`: held-out faces degraded to each of `sizes` pixels (and at full
  size, `data/degrade.to_resolution`), the mean predicted quality per size and the Spearman rho
  between quality and resolution over all of them (and per face, averaged).
- `lfw_pair_quality`: `pair_set_quality` on the test pairs of an LFW pairs file and
  `quality_vs_resolution` on its faces (config.eval.lfw_quality).
- `perceptibility_weights`: the attention's mean weight per position over some faces.
"""

from __future__ import annotations

import jax
import numpy as np

from facemoe_jax.data import degrade
from facemoe_jax.core.images import normalize_images
from facemoe_jax.evaluate import embed, quality
from facemoe_jax.models.recognizability import ATTENTION_NAME, head_quality

REJECT_FRACTION = 0.2  # the share of pairs the summary rejects


def make_quality_fn(model, flip_test: bool = True) -> embed.EmbedFn:
    """jit(variables, uint8 images (B, H, W, 3)) -> (B,) float32 predicted quality."""

    @jax.jit
    def quality_fn(variables, images):
        return head_quality(model, variables, normalize_images(images), flip_test)

    return embed.EmbedFn(quality_fn)


def _erc_set(
    emb_a, emb_b, quality_a, quality_b, issame, fmr: float, seed: int, prefix: str, groups=None
):
    """ERCs of pairs, given the raw embeddings and head scores of their two faces, by the
    quality head, the norm (each the lower of the pair's two) and at random, the curves named
    "as given: ..." or, with prefix "mixed_", "mixed resolution: ..."; the FNMR summary; with
    `groups` (each genuine pair's identity) the 95 % bootstrap interval of FNMR(head) -
    FNMR(norm) at 20 % rejected (`quality.bootstrap_reject_difference`)."""
    from facemoe_jax.evaluate import verification

    scores = 1.0 - verification.pair_distances(emb_a, emb_b) / 2.0
    norm_quality = np.minimum(
        quality.embedding_norm_quality(emb_a), quality.embedding_norm_quality(emb_b)
    )
    head_quality = np.minimum(quality_a, quality_b)
    curves = {
        "quality head": quality.error_versus_reject(scores, issame, head_quality, fmr),
        "embedding norm": quality.error_versus_reject(scores, issame, norm_quality, fmr),
        "random": quality.random_rejection(scores, issame, fmr, seed=seed),
    }
    metrics = {f"{prefix}fnmr_reject0": quality.fnmr_at_reject(curves["random"], 0.0)}
    for kind, key in (
        ("quality head", "quality"),
        ("embedding norm", "norm"),
        ("random", "random"),
    ):
        metrics[f"{prefix}fnmr_reject20_{key}"] = quality.fnmr_at_reject(
            curves[kind], REJECT_FRACTION
        )
        metrics[f"{prefix}erc_auc_{key}"] = curves[kind]["auc"]
    if groups is not None:
        # Is the head's lead over the norm more than the draw of faces?
        low, high = quality.bootstrap_reject_difference(
            scores, issame, head_quality, norm_quality, groups, REJECT_FRACTION, fmr, seed=seed
        )
        metrics[f"{prefix}fnmr_reject20_quality_minus_norm_low"] = low
        metrics[f"{prefix}fnmr_reject20_quality_minus_norm_high"] = high
    label = "mixed resolution" if prefix else "as given"
    return metrics, {f"{label}: {kind}": erc for kind, erc in curves.items()}


def mixed_resolution(images: np.ndarray, sizes, image_size: int, seed: int):
    """Each face degraded to a size drawn (seeded) from `sizes` below the input or kept at full
    size: (images, pixels per image)."""
    pixels = sorted({int(p) for p in sizes if int(p) < image_size}) + [image_size]
    drawn = np.random.default_rng(seed).choice(pixels, len(images))
    out = np.stack(
        [
            face if px >= image_size else degrade.to_resolution(face, int(px))
            for face, px in zip(images, drawn)
        ]
    )
    return out, drawn


def pair_set_quality(
    quality_fn,
    embed_fn,
    variables,
    images_a,
    images_b,
    issame,
    sizes,
    image_size: int,
    fmr: float,
    batch_size: int,
    seed: int = 0,
):
    """(metrics, {curve name: ERC}) of one verification set, twice: as it is, and with its
    second faces degraded to mixed resolutions (`mixed_resolution`, prefix "mixed_"): the
    FNMR at FMR `fmr` before and after rejecting the 20 % lowest-quality pairs by the quality
    head, the embedding norm and at random, and each ERC's area.

    embed_fn: uint8 images -> raw embeddings (flip test as configured)."""
    metrics, curves = {}, {}
    emb_a = embed_fn(images_a)
    qa = embed.embed_images(quality_fn, variables, images_a, batch_size)
    mixed_b, _ = mixed_resolution(images_b, sizes, image_size, seed)
    for prefix, faces_b in (("", images_b), ("mixed_", mixed_b)):
        emb_b = embed_fn(faces_b)
        qb = embed.embed_images(quality_fn, variables, faces_b, batch_size)
        m, c = _erc_set(emb_a, emb_b, qa, qb, issame, fmr, seed, prefix)
        metrics.update(m)
        curves.update(c)
    return metrics, curves


def identity_pairs(num_identities: int, images_per_identity: int, seed: int):
    """(index_a, index_b, issame) over identity-major images (image j of identity i at
    i * k + j): every same-identity pair once, then as many different-identity pairs, each
    of two random images of two different random identities (seeded)."""
    k = images_per_identity
    if num_identities < 2 or k < 2:
        raise ValueError(f"need >= 2 identities of >= 2 images each, got {num_identities} x {k}")
    first, second = np.triu_indices(k, 1)
    same_a = (np.arange(num_identities)[:, None] * k + first).ravel()
    same_b = (np.arange(num_identities)[:, None] * k + second).ravel()
    rng = np.random.default_rng([seed, 0x9A12])
    n = len(same_a)
    ids_a = rng.integers(num_identities, size=n)
    ids_b = (ids_a + 1 + rng.integers(num_identities - 1, size=n)) % num_identities
    diff_a = ids_a * k + rng.integers(k, size=n)
    diff_b = ids_b * k + rng.integers(k, size=n)
    issame = np.arange(2 * n) < n
    return np.concatenate([same_a, diff_a]), np.concatenate([same_b, diff_b]), issame


def quality_identity_set(
    quality_fn,
    embed_fn,
    variables,
    images: np.ndarray,
    issame_pairs,
    images_per_identity: int,
    sizes,
    image_size: int,
    fmr: float,
    batch_size: int,
    seed: int = 0,
):
    """`pair_set_quality` for pairs drawn from one set of images (`identity_pairs`): each image
    is embedded and scored once, at full size and at a mixed resolution, and a pair's second
    face is taken at full size ("as given") or mixed ("mixed_"). Many more pairs than images:
    at FMR 1e-3 the threshold of a 1,000-pair set is its single highest impostor score. Adds
    the bootstrap interval of head minus norm (`_erc_set`, genuine pairs drawn by identity)."""
    index_a, index_b, issame = issame_pairs
    emb = embed_fn(images)
    q = embed.embed_images(quality_fn, variables, images, batch_size)
    mixed, _ = mixed_resolution(images, sizes, image_size, seed)
    emb_mixed = embed_fn(mixed)
    q_mixed = embed.embed_images(quality_fn, variables, mixed, batch_size)
    metrics, curves = {}, {}
    for prefix, emb_b, q_b in (("", emb, q), ("mixed_", emb_mixed, q_mixed)):
        m, c = _erc_set(
            emb[index_a],
            emb_b[index_b],
            q[index_a],
            q_b[index_b],
            issame,
            fmr,
            seed,
            prefix,
            groups=index_a // images_per_identity,
        )
        metrics.update(m)
        curves.update(c)
    metrics["pairs"] = float(len(issame))
    return metrics, curves


def quality_vs_resolution(
    quality_fn, variables, images: np.ndarray, sizes, image_size: int, batch_size: int
):
    """(metrics, curve): Spearman rho between predicted quality and resolution over `images`
    degraded to every size below the input and at full size (pooled over all faces, and the
    mean over faces of each face's own rho); mean quality per size."""
    pixels = sorted({int(p) for p in sizes if int(p) < image_size}) + [image_size]
    qualities = []
    for px in pixels:
        faces = (
            images
            if px >= image_size
            else np.stack([degrade.to_resolution(face, px) for face in images])
        )
        qualities.append(embed.embed_images(quality_fn, variables, faces, batch_size))
    rho = quality.spearman_rho(np.concatenate(qualities), np.repeat(pixels, len(images)))
    # Per face: does the quality of one face fall as that face is degraded (free of how faces
    # differ from each other, which the pooled rho also ranks)?
    per_face = np.mean([quality.spearman_rho(q, pixels) for q in np.stack(qualities, axis=1)])
    metrics = {
        "spearman_rho": rho,
        "spearman_rho_per_face": float(per_face),
        **{f"mean_quality@{px}px": float(np.mean(q)) for px, q in zip(pixels, qualities)},
    }
    curve = {
        "pixels": pixels,
        "mean": [float(np.mean(q)) for q in qualities],
        "std": [float(np.std(q)) for q in qualities],
        "spearman_rho": rho,
    }
    return metrics, curve


def spread_subset(count: int, total: int) -> np.ndarray:
    """`count` indices spread evenly over range(total) (all of them when count >= total): a
    pairs file lists people alphabetically, so its first faces would be a few people's."""
    if count >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, count).round().astype(int))


def lfw_pair_quality(
    quality_fn,
    embed_fn,
    variables,
    pairs,
    sizes,
    image_size: int,
    fmr: float,
    batch_size: int,
    resolution_faces: int,
    seed: int = 0,
):
    """(metrics, {curve name: ERC}, quality-vs-resolution curve) of LFW test pairs
    (`lfw.pair_faces`): `pair_set_quality` on the pairs as given and with their second faces
    at mixed resolutions drawn from `sizes`, and `quality_vs_resolution` over
    `resolution_faces` of their faces (spread over the file) degraded to every size. The
    degradations are this module's (`data/degrade.to_resolution`: area down, bilinear up), as
    for the other pair sets; the LFW accuracy rows resize back with cubic instead."""
    faces = pairs.faces
    metrics, curves = pair_set_quality(
        quality_fn,
        embed_fn,
        variables,
        faces[pairs.index_a],
        faces[pairs.index_b],
        pairs.issame,
        sizes,
        image_size,
        fmr,
        batch_size,
        seed,
    )
    picked = faces[spread_subset(resolution_faces, len(faces))]
    by_resolution, curve = quality_vs_resolution(
        quality_fn, variables, picked, sizes, image_size, batch_size
    )
    metrics.update(by_resolution)
    metrics.update(pairs=float(len(pairs.issame)), fmr=float(fmr), faces=float(len(picked)))
    return metrics, curves, curve


def perceptibility_weights(model, variables, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(S,) the attention weight of each position, averaged over `images` (uint8)."""

    @jax.jit
    def weights_fn(variables, images):
        _, state = model.apply(
            variables, normalize_images(images), train=False, mutable=["intermediates"]
        )
        return state["intermediates"][ATTENTION_NAME]["weights"][0]

    fn = embed.EmbedFn(weights_fn)
    return embed.embed_images(fn, variables, images, batch_size).mean(axis=0)
