"""A synthetic TinyFace-like identification benchmark: LR probes against an HR gallery.

TinyFace (QMUL) is the low-resolution benchmark of every seed paper: ~20 px surveillance faces
as probes, searched in a gallery of one or more match images per identity plus ~153k distractor
faces, scored by closed-set rank-k. Its synthetic twin, with nothing to download:

  identities   held-out synthetic people from ``TINYFACE_FIRST_IDENTITY`` (2,000,000) on, disjoint
               from training, from the LR training set (500,000+) and from the verification
               pairs (1,000,000+);
  probes       ``synthetic_tinyface_probes`` images per identity (image indices 1, 2, ...), each
               captured at low resolution like a distant camera
               (``degrade.acquisition_low_resolution`` with ``config.data.acquisition_*``);
  gallery      image 0 of each identity at full resolution (the enrolment photo), plus image 0
               of ``synthetic_tinyface_distractors`` further identities (label -100);
  score        cosine of flip-test embeddings; rank-k = share of probes whose identity's gallery
               image is among the k most similar (``tinyface.rank_k_accuracy``).

Everything is a pure function of ``config.seed``, so every model is scored on the same faces.
"""

from __future__ import annotations

import numpy as np

from facemoe_jax.data import degrade, synthetic
from facemoe_jax.evaluate import tinyface


def parse_ranks(spec: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(v) for v in str(spec).split(",") if v.strip())
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1:
        raise ValueError(
            f"config.eval.synthetic_tinyface_ranks={spec!r} is not a comma list of ranks >= 1"
        )
    return ranks


def check_config(config) -> None:
    ev = config.eval
    if ev.synthetic_tinyface_identities < 0 or ev.synthetic_tinyface_distractors < 0:
        raise ValueError(
            "config.eval.synthetic_tinyface_identities and synthetic_tinyface_distractors "
            "must be >= 0"
        )
    if ev.synthetic_tinyface_identities and ev.synthetic_tinyface_probes < 1:
        raise ValueError(
            f"config.eval.synthetic_tinyface_probes={ev.synthetic_tinyface_probes} must be >= 1"
        )
    parse_ranks(ev.synthetic_tinyface_ranks)
    degrade.acquisition_settings(config.data)


def build_protocol(config) -> dict[str, np.ndarray]:
    """uint8 images at the input size and labels: "probes" (LR captures), "hr_probes" (the same
    images uncaptured), "probe_labels", "gallery", "gallery_labels" (-100 = distractor)."""
    ev, size, seed = config.eval, int(config.model.image_size), int(config.seed)
    first = synthetic.TINYFACE_FIRST_IDENTITY
    num_ids, num_probes = int(ev.synthetic_tinyface_identities), int(ev.synthetic_tinyface_probes)
    settings = degrade.acquisition_settings(config.data)
    keys = [(first + i, 1 + k) for i in range(num_ids) for k in range(num_probes)]
    hr_probes = np.stack([synthetic.render_identity_image(i, k, size, seed) for i, k in keys])
    probes = np.stack(
        [
            degrade.acquisition_low_resolution(
                image, synthetic.capture_generator(i, k, seed), **settings
            )
            for image, (i, k) in zip(hr_probes, keys)
        ]
    )
    gallery_ids = range(num_ids + int(ev.synthetic_tinyface_distractors))
    gallery = np.stack(
        [synthetic.render_identity_image(first + i, 0, size, seed) for i in gallery_ids]
    )
    return {
        "probes": probes,
        "hr_probes": hr_probes,
        "probe_labels": np.repeat(np.arange(num_ids), num_probes),
        "gallery": gallery,
        "gallery_labels": np.where(
            np.arange(len(gallery)) < num_ids, np.arange(len(gallery)), tinyface.DISTRACTOR_LABEL
        ),
    }


def evaluate_synthetic_tinyface(embed_array, config, protocol=None) -> dict[str, float]:
    """{"rank1": ..., "rank5": ..., "rank10": ..., "hr_rank1": ...} with
    `embed_array(uint8 images) -> (N, D)`; hr_rank1 searches with the uncaptured probes, so the
    gap to rank1 is what the low resolution costs on the same faces."""
    protocol = build_protocol(config) if protocol is None else protocol
    gallery = embed_array(protocol["gallery"])

    def search(probes, ranks):
        return tinyface.rank_k_accuracy(
            embed_array(probes),
            protocol["probe_labels"],
            gallery,
            protocol["gallery_labels"],
            ranks=ranks,
        )

    metrics = search(protocol["probes"], parse_ranks(config.eval.synthetic_tinyface_ranks))
    metrics["hr_rank1"] = search(protocol["hr_probes"], (1,))["rank1"]
    return metrics
