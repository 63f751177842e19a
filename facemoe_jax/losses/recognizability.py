r"""The recognizability index (RI, Chai et al., CVPR 2023, as we read it): pure math.

Notation: e = an image's L2-normalised embedding, w_y its class prototype (the normalised class
centre), w_j the other real classes, c = c_UI the unrecognizable-identity centre. RI in [0, 1]
mixes how far e is from c (``ui_weight``) with the angular margin between w_y and the nearest
w_j; the diversion hinge pushes images of low RI away from c; the quality head regresses RI (or
the "agreement" target) of copies of the batch at several resolutions with smooth-L1.
No official code exists: the formulas are ours, every constant is in config.recognizability,
and docs/recognizability.md ("Design notes, item by item") gives each one and why. The
objectives that use them are train/objectives/recognizability.py and quality.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from facemoe_jax.losses import classifier
from facemoe_jax.losses.classifier import l2_normalize

WEIGHTINGS = ("threshold", "soft")
_NO_NEGATIVE = -2.0  # below any cosine: "no other class here"


def resize_through(images: jax.Array, pixels: int) -> jax.Array:
    """(B, H, W, 3) -> the same faces with only `pixels` x `pixels` of information: antialiased
    linear resize down (area-like averaging, as evaluation's cv2.INTER_AREA), bilinear back."""
    b, h, w, c = images.shape
    small = jax.image.resize(
        images.astype(jnp.float32), (b, pixels, pixels, c), "linear", antialias=True
    )
    return jax.image.resize(small, (b, h, w, c), "linear", antialias=False)


def degrade_beyond_recognition(
    images: jax.Array, rng: jax.Array, pixels: int, noise_std: float
) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] -> the same faces at `pixels` x `pixels` (antialiased linear
    resize, i.e. area-like averaging, then bilinear back) plus Gaussian noise, clipped."""
    x = resize_through(images, pixels)
    x = x + noise_std * jax.random.normal(rng, x.shape, jnp.float32)
    return jnp.clip(x, -1.0, 1.0)


def update_centre(centre: jax.Array, ui_embeddings: jax.Array, momentum: float) -> jax.Array:
    """c <- normalise(m c + (1 - m) normalise(mean_i normalise(u_i))); c = 0 at the start."""
    batch_direction = l2_normalize(jnp.mean(l2_normalize(ui_embeddings), axis=0))
    return l2_normalize(momentum * centre + (1.0 - momentum) * batch_direction)


def _own_and_hardest(embeddings, centers, labels, first, num_classes):
    """(cos to the own class, highest cos to another real class) over the rows `first` ..
    `first + rows - 1` held here; (0, -2) where the own class / no negative is here."""
    cosines = classifier.cosine_logits(embeddings, centers)
    class_ids = first + jnp.arange(centers.shape[0])
    is_own = class_ids[None, :] == labels[:, None]
    own = jnp.sum(jnp.where(is_own, cosines, 0.0), axis=1)
    negative = (class_ids < num_classes)[None, :] & ~is_own
    hardest = jnp.max(jnp.where(negative, cosines, _NO_NEGATIVE), axis=1)
    return own, hardest


def prototype_cosines(
    embeddings, centers, labels, *, num_classes: int, class_axes: tuple[str, ...]
):
    """(cos(e, w_y), max_{j != y} cos(e, w_j)), each (B,) float32, without gradient.

    Under an active mesh whose ``class_axes`` split the centre rows, each device compares the
    (replicated) embeddings with its own rows; the own-class cosine is a ``psum`` (one device
    holds the class, the others add 0) and the hardest negative a ``pmax`` over ``class_axes``.
    """
    embeddings = jax.lax.stop_gradient(embeddings)
    centers = jax.lax.stop_gradient(centers)
    labels = jnp.asarray(labels, jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not class_axes or math.prod(mesh.shape[a] for a in class_axes) == 1:
        return _own_and_hardest(embeddings, centers[:num_classes], labels, 0, num_classes)
    rows = centers.shape[0] // math.prod(mesh.shape[a] for a in class_axes)

    def local(emb, local_centers, labels):
        first = classifier._shard_index(class_axes) * rows
        own, hardest = _own_and_hardest(emb, local_centers, labels, first, num_classes)
        return jax.lax.psum(own, class_axes), jax.lax.pmax(hardest, class_axes)

    return jax.shard_map(
        local,
        in_specs=(P(), P(class_axes), P()),
        out_specs=(P(), P()),
        axis_names=set(class_axes),
    )(embeddings, centers, labels)


def _angle(cosine, power: float = 1.0):
    """arccos, then pi * (theta / pi) ** power (power 1: the angle itself)."""
    theta = jnp.arccos(jnp.clip(cosine, -1.0, 1.0))
    return theta if power == 1.0 else math.pi * (theta / math.pi) ** power


def recognizability_index(
    cos_ui,
    cos_own,
    cos_hardest,
    *,
    ui_weight: float,
    ui_angle_scale: float,
    margin_angle_scale: float,
    angle_power: float = 1.0,
) -> jax.Array:
    """RI in [0, 1] per image (module docstring, items 2 and 4), without gradient; cos_own is
    the cosine to the positive (the class centre, or the own full-size embedding)."""
    cos_ui, cos_own, cos_hardest = (
        jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)) for x in (cos_ui, cos_own, cos_hardest)
    )
    s_ui = jnp.clip(_angle(cos_ui, angle_power) / ui_angle_scale, 0.0, 1.0)
    margin = _angle(cos_hardest, angle_power) - _angle(cos_own, angle_power)
    s_cls = jnp.clip(0.5 + margin / (2 * margin_angle_scale), 0.0, 1.0)
    return ui_weight * s_ui + (1.0 - ui_weight) * s_cls


def diversion_loss(
    cos_ui, ri, *, threshold: float, margin: float, weighting: str = "threshold"
) -> jax.Array:
    """mean_i w_i max(0, cos(e_i, c) - margin), w_i = [RI_i < threshold] or 1 - RI_i."""
    ri = jax.lax.stop_gradient(ri)
    if weighting == "threshold":
        weights = (ri < threshold).astype(jnp.float32)
    elif weighting == "soft":
        weights = 1.0 - ri
    else:
        raise ValueError(f"diversion weighting {weighting!r} is not one of {WEIGHTINGS}")
    return jnp.mean(weights * jax.nn.relu(cos_ui - margin))


def smooth_l1(prediction, target, beta: float = 0.75, weights=None) -> jax.Array:
    """Mean Huber-style smooth L1 (PyTorch's): 0.5 d^2 / beta for |d| < beta, else |d| - beta/2;
    with `weights`, their weighted mean (0 when every weight is 0)."""
    d = jnp.abs(jnp.asarray(prediction, jnp.float32) - jnp.asarray(target, jnp.float32))
    loss = jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    if weights is None:
        return jnp.mean(loss)
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.sum(weights * loss) / jnp.maximum(jnp.sum(weights), 1e-12)


def quality_copies(images: jax.Array, pixels: tuple[int, ...], count: int) -> jax.Array:
    """The first `count` (0 = all) images, image i resized to pixels[i mod G] and back (G =
    len(pixels) + 1; i mod G = len(pixels): kept at full size): item 4's copies, same order."""
    if count:
        images = images[:count]
    groups = len(pixels) + 1
    copies = images.astype(jnp.float32)
    for g, px in enumerate(pixels[: images.shape[0]]):
        copies = copies.at[g::groups].set(resize_through(images[g::groups], int(px)))
    return copies


def parse_pixels(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(",") if p.strip())


def index_against_centre(
    embeddings,
    centers,
    labels,
    centre,
    *,
    num_classes,
    class_axes,
    ui_weight,
    ui_angle_scale,
    margin_angle_scale,
    angle_power=1.0,
    reference=None,
):
    """(cos(e, c_UI), RI) of raw embeddings: item 2, or with `reference` (embeddings of the same
    images at full size) the cosine to it as the positive instead of the class centre."""
    unit = l2_normalize(embeddings)
    cos_ui = unit @ jax.lax.stop_gradient(centre)
    cos_own, cos_hardest = prototype_cosines(
        embeddings, centers, labels, num_classes=num_classes, class_axes=class_axes
    )
    if reference is not None:
        cos_own = jnp.sum(unit * l2_normalize(reference), axis=-1)
    ri = recognizability_index(
        cos_ui,
        cos_own,
        cos_hardest,
        ui_weight=ui_weight,
        ui_angle_scale=ui_angle_scale,
        margin_angle_scale=margin_angle_scale,
        angle_power=angle_power,
    )
    return cos_ui, ri


def agreement_index(
    copies, reference, agreement, *, agreement_weight: float, angle_power: float
) -> jax.Array:
    """Item 5's target: (1 - w) (1 - (theta(f_k, f_i^full) / pi) ** power) + w clip(agreement,
    0, 1), without gradient."""
    cos_full = jnp.sum(l2_normalize(copies) * l2_normalize(reference), axis=-1)
    resolution = 1.0 - _angle(jax.lax.stop_gradient(cos_full), angle_power) / math.pi
    agreement = jnp.clip(jax.lax.stop_gradient(agreement), 0.0, 1.0)
    return (1.0 - agreement_weight) * resolution + agreement_weight * agreement


def copy_index(cfg, copies, centers, labels, centre, reference, num_classes, class_axes):
    """The quality head's target RI_k for the copies (item 4): item 2 with quality_ui_weight,
    quality_angle_power and, with `reference` (the copies' own full-size embeddings, target
    "own_full"), the cosine to it as the positive; the hardest negative stays the nearest
    other class centre."""
    return index_against_centre(
        copies,
        centers,
        labels,
        centre,
        num_classes=num_classes,
        class_axes=class_axes,
        ui_weight=cfg.quality_ui_weight,
        ui_angle_scale=cfg.ui_angle_scale,
        margin_angle_scale=cfg.margin_angle_scale,
        angle_power=cfg.quality_angle_power,
        reference=reference,
    )[1]
