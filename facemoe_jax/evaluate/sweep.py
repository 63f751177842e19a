"""Resolution sweeps: verification accuracy as a function of the probe's pixel count.

Any pair set is evaluated again with faces degraded to P x P pixels and resized back to the
model input (`data.degrade.to_resolution`, area down, bilinear up):

* ``sides="both"``: both faces of every pair are degraded (two low-resolution captures);
* ``sides="probe"``: only the second face of every pair is degraded, the first stays a
  high-resolution gallery face (the surveillance-to-enrolment setting of the low-resolution
  papers), so its embeddings are computed once.

A size at or above the input size leaves the faces as they are, so a sweep ending at the input
size (or 112) closes the curve with the full-resolution number.
"""

from __future__ import annotations

import numpy as np

from facemoe_jax.data import degrade

SIDES = ("both", "probe")


def parse_sizes(spec: str, field: str = "config.eval.low_resolutions") -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(spec).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{field}={spec!r} is not a comma list of pixel sizes") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{field}={spec!r} has a size below 1 pixel")
    return values


def parse_sides(spec: str) -> tuple[str, ...]:
    sides = tuple(s.strip() for s in str(spec).split(",") if s.strip())
    bad = [s for s in sides if s not in SIDES]
    if bad:
        raise ValueError(f"config.eval.low_resolution_sides={spec!r}: {bad} not among {SIDES}")
    return sides


def degrade_images(images: np.ndarray, pixels: int) -> np.ndarray:
    """(N, S, S, 3) uint8 at `pixels` px of information; unchanged when pixels >= S."""
    if pixels >= images.shape[1]:
        return images
    return np.stack([degrade.to_resolution(im, pixels) for im in images])


def entry_name(set_name: str, pixels: int, side: str) -> str:
    """results.json key: 'lfw@8px' (both sides degraded) or 'lfw@probe8px'."""
    return f"{set_name}@{pixels}px" if side == "both" else f"{set_name}@probe{pixels}px"


def images_to_embed(num_pairs: int, sizes, sides=("both",)) -> int:
    """How many images `resolution_sweep` embeds (for its progress line)."""
    per_size = {"both": 2 * num_pairs, "probe": num_pairs}
    return sum(per_size[side] * len(sizes) for side in sides) + num_pairs * ("probe" in sides)


def resolution_sweep(set_name, embed, verify, images_a, images_b, issame, sizes, sides=("both",)):
    """{entry_name(set_name, size, side): metrics} for every size and side.

    Args:
      embed: (N, S, S, 3) uint8 -> (N, D) raw embeddings.
      verify: (emb_a, emb_b, issame) -> metrics dict (e.g. `verification.verification_metrics`).
    """
    results = {}
    emb_a_full = None
    for side in sides:
        for pixels in sizes:
            b = degrade_images(images_b, pixels)
            if side == "both":
                emb_a = embed(degrade_images(images_a, pixels))
            else:
                emb_a_full = embed(images_a) if emb_a_full is None else emb_a_full
                emb_a = emb_a_full
            results[entry_name(set_name, pixels, side)] = verify(emb_a, embed(b), issame)
    return results
