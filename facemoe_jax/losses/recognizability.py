r"""The recognizability index (RI) and its losses (Chai et al., CVPR 2023), as we read them.

No official code exists and the full text was not reachable (see /work/shared/spec/lr_methods.md
section C): the paper's abstract and third-party notes say *what* the parts are (an
unrecognizable-identity centre, positive and nearest negative class prototypes, an "index
diversion" hinge, a perceptibility attention, an RI regression head with smooth-L1, beta 0.75);
the formulas below are ours, every constant is in ``config.recognizability``.

Notation: e = L2-normalised embedding of an image, w_y = its class prototype (the L2-normalised
class centre of the classifier), w_j the other real classes, c = c_UI.

1. **Unrecognizable-identity centre** (``update_centre``). Each step, ``ui_images`` images of the
   batch are degraded beyond recognition (``degrade_beyond_recognition``: area-resized to
   ``ui_pixels`` x ``ui_pixels``, bilinear back, plus Gaussian noise of ``ui_noise_std`` in the
   [-1, 1] pixel scale) and embedded by the current encoder in evaluation mode, without gradient.
   With u = normalise(mean_i normalise(f(degraded_i))) and momentum m:

       c <- normalise(m * c + (1 - m) * u)

   The state starts at c = 0, so the first step sets c = u exactly. A step whose loss or gradient
   is not finite leaves c unchanged (the train step keeps the whole state).

2. **RI** per image, in [0, 1] (``recognizability_index``), from three angles:
   theta_UI = arccos cos(e, c), theta_P = arccos cos(e, w_y), theta_N = arccos max_{j != y} cos(e, w_j):

       s_UI  = clip(theta_UI / ui_angle_scale, 0, 1)                         (far from c = 1)
       s_cls = clip(0.5 + (theta_N - theta_P) / (2 * margin_angle_scale), 0, 1) (0.5 on the boundary)
       RI    = ui_weight * s_UI + (1 - ui_weight) * s_cls

   Both scales default to pi, the full range of the angles (theta_UI in [0, pi], theta_N - theta_P
   in [-pi, pi]), so neither term clips: RI keeps ranking faces where a smaller scale saturates
   (with pi/2 and 0.5 nearly every training face, orthogonal to c and well classified, scored
   the same). Smaller scales stretch the middle of the range and clip its ends.

   RI carries no gradient (a target and a selector, never a path). Under the class-sharded
   classifier each device holds some rows of the centre matrix: its own-class cosine is summed
   and its hardest negative maximised over the class axes (``prototype_cosines``).

3. **Index diversion loss** (``diversion_loss``): images with a low RI are pushed away from c,

       L_ID = mean_i  w_i * max(0, cos(e_i, c) - diversion_margin),
       w_i  = [RI_i < diversion_threshold]   ("threshold")   or   1 - RI_i   ("soft"),

   with c and w_i constants (no gradient); the gradient flows through e_i only.

4. **Quality regression** (``smooth_l1``, ``quality_copies``, ``copy_index``): the quality head
   learns from copies of the batch that span the resolutions, so that its target varies with
   resolution instead of with what the batch happens to hold. Each step the first
   ``quality_images`` images are split into G = len(quality_pixels) + 1 groups (image i in
   group i mod G; sizes not below the input size are dropped); group g is resized to
   quality_pixels[g] pixels and back (as the c_UI copies, no noise), the last group stays at full
   size. The images copied are the geometry-only ones (``quality_source="clean"``:
   ``batch["image_hr"]``, which the train loop asks the pipeline's paired mode for), so a
   "full-size" copy is never a face the augmentation already degraded to 8 px;
   ``quality_source="batch"`` copies the augmented batch (the first version). The copies (and,
   for the "own_full" target, the full-size images they come from) are embedded by the current
   encoder in evaluation mode, without gradient, in the same forward pass as the c_UI copies.
   The target RI_k of copy k (of image i, label y) is item 2 with three changes, all ours:

       theta_P = angle(f_k, f_i^full)     quality_target="own_full": the same image at full size,
                                          embedded in the same pass ("prototype": w_y, item 2)
       every angle theta -> pi (theta / pi) ** quality_angle_power        (0.5; 1 = as is)
       ui_weight -> quality_ui_weight                                      (0: no c_UI term)

   Why: the class centre w_y has been fitted to the training image itself, and the encoder is
   trained to be resolution-invariant, so on the demo model cos(f_k, w_y) hardly changes above
   16 px and RI_k saturated (mean RI of training faces 0.517 at 12 px ... 0.522 at 48 px, the
   spread between faces 0.036). The own full-size embedding is a positive that is not fitted to
   the copy: the angle to it is 0 at full size and grows with every step of degradation. The
   power 0.5 spreads the small angles near full size (cos 0.994 at 32 px is 0.11 rad, 0.19 of
   pi after the power). The distance to c_UI differs between faces at every size by more than
   the sizes differ, and a head reading the embedding learns it easily, so its weight in the
   quality target is 0 by default (it stays in item 2's RI, which selects the diverted faces).
   Training-side checks on the demo model (training faces only, never the held-out ones): the
   target's Spearman rho with the resolution over 8..48 px is 0.25 with the first version's
   target, 0.93 with the own full-size positive, power 0.5 and c_UI weight 0.25, 0.955 with
   weight 0 (512 faces, 1.00 per face); with weight 0.25 the trained head's own rho on
   training faces was 0.63, its spread within one size driven by the cosine to c_UI
   (correlation -0.55 at every size), hence weight 0.

   The head (training mode: its dropout on) predicts q_k in (0, 1) from the copy's stop-gradient
   features (its embedding and, by ``config.model.quality_head_input``, statistics of its first
   linear layer's response: by default the detail statistics, models/recognizability.py):

       L_Q = mean_k smoothL1_beta(q_k - RI_k),   beta = quality_beta (0.75, the paper's)

   so L_Q trains the head alone, never the encoder. The first version is ``quality_source=
   "batch"``, ``quality_target="prototype"``, ``quality_angle_power=1``, ``quality_ui_weight``
   = ``ui_weight`` and ``config.model.quality_head_input="embedding"``.

5. **Agreement target** (``quality_target="agreement"``; the class means: losses/class_means.py): items 4's targets say how far a copy is from its own full-size image
   and from the nearest other class, so at full size they say almost nothing about whether the
   face will match *another* image of its identity, which is what rejecting pairs needs (on the
   demo model the head rejected HR pairs nearly at random, the embedding norm did better). The
   train state keeps, per class y, the running mean m_y of the normalised full-size embeddings
   of its geometry-only images as the train step sees them (``ri_classes``: "mean" (rows, D),
   "count" (rows,); rows split like the class centres), an exact average over the first
   ``agreement_window`` images of the class and an EMA of rate 1 / agreement_window after; its
   norm is how tightly the class's images agree. The target of copy k of image i (label y):

       s_res   = 1 - (theta(f_k, f_i^full) / pi) ** quality_angle_power      (1 at full size)
       s_agree = clip(normalise(f_k) . m_y, 0, 1)      (m_y before this step's images enter it)
       RI_k    = (1 - quality_agreement_weight) * s_res + quality_agreement_weight * s_agree

   s_agree is the mean cosine to the class's other images (times nothing else: m_y is not
   normalised, so a class whose images scatter scores lower), measured before the image itself
   enters the mean. Copies of a class no image has entered yet are left out of L_Q (weight 0).
   Why a mean of embeddings and not the class centre w_y: the centre is a unit vector fitted to
   every training image of the class, so the cosine to it is high for nearly every training
   face; on the demo model (validation identities, never trained on nor evaluated), a ridge
   probe regressing the mean cosine to the identity's other images ranked pairs better than the
   embedding norm, one regressing the cosine to the class centre worse. Neither the c_UI term
   nor the hardest negative enters this target.

Total added to the train loss: diversion_weight * L_ID + quality_weight * L_Q.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from facemoe_jax.losses import classifier
from facemoe_jax.losses.classifier import l2_normalize
from facemoe_jax.models.recognizability import QUALITY_KEY

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


def sown_quality(intermediates) -> jax.Array | None:
    """The quality head's (B,) prediction from a forward pass's "intermediates" collection."""
    if not intermediates or QUALITY_KEY not in intermediates:
        return None
    return intermediates[QUALITY_KEY][0]


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
