"""Face quality: error-versus-reject curves (ERC) and their area.

A quality score is useful when rejecting the faces it rates lowest removes the recognition
errors. The ERC (Grother & Tabassi; the curves of SER-FIQ, MagFace, CR-FIQA) shows that:

1. fix the decision threshold once, on all pairs, at a target false-match rate: the
   ``1 - fmr`` quantile of the impostor scores (a pair matches when its score is above it);
2. a pair's quality is the lower quality of its two faces;
3. for each reject fraction r, drop the ``round(r * N)`` lowest-quality pairs (ties: the earlier
   pair goes first) and report the false non-match rate of the genuine pairs that remain.

The area under the curve (trapezoid over the reject fractions) is the summary number: lower is
better. Quality scores: the embedding norm (before normalisation, of f(x) + f(flip x)); the
recognizability quality head's prediction (evaluate/recognizability.py), when the model has one;
and random rejection (the mean curve over seeded random orders: what rejecting blindly gives).
`spearman_rho` ranks a quality score against the resolution the faces were degraded to.
"""

from __future__ import annotations

import numpy as np

DEFAULT_REJECT_FRACTIONS = np.round(np.arange(0.0, 0.951, 0.05), 2)


def embedding_norm_quality(embeddings: np.ndarray) -> np.ndarray:
    """(N,) L2 norm of raw embeddings (N, D), the quality proxy of MagFace/AdaFace."""
    return np.linalg.norm(np.asarray(embeddings, np.float64), axis=1)


def threshold_at_fmr(scores: np.ndarray, issame: np.ndarray, fmr: float) -> float:
    """The (1 - fmr) quantile of impostor scores ('higher' method): at most fmr of them exceed it."""
    impostors = np.asarray(scores, np.float64)[~np.asarray(issame, bool)]
    if impostors.size == 0:
        raise ValueError("threshold_at_fmr needs impostor (different-identity) pairs, got none")
    return float(np.quantile(impostors, 1.0 - fmr, method="higher"))


def error_versus_reject(
    scores: np.ndarray,
    issame: np.ndarray,
    pair_quality: np.ndarray,
    fmr: float = 1e-3,
    reject_fractions: np.ndarray = DEFAULT_REJECT_FRACTIONS,
) -> dict[str, np.ndarray | float]:
    """ERC of one pair set (see the module docstring).

    Args:
      scores: (N,) pair similarities (higher = more alike). issame: (N,) bools.
      pair_quality: (N,) quality of each pair (e.g. the minimum of its two faces' qualities).
      fmr: false-match rate that fixes the threshold.
      reject_fractions: increasing fractions in [0, 1).
    Returns:
      {"reject_fraction": (R,), "fnmr": (R,), "threshold": t, "auc": area under fnmr(r)};
      fnmr is NaN where no genuine pair remains.
    """
    scores = np.asarray(scores, np.float64)
    issame = np.asarray(issame, bool)
    pair_quality = np.asarray(pair_quality, np.float64)
    if not scores.shape == issame.shape == pair_quality.shape or scores.ndim != 1:
        raise ValueError(
            f"scores, issame and pair_quality must be (N,) alike, got {scores.shape}, "
            f"{issame.shape}, {pair_quality.shape}"
        )
    reject_fractions = np.asarray(reject_fractions, np.float64)
    if np.any(reject_fractions < 0) or np.any(reject_fractions >= 1):
        raise ValueError(f"reject fractions must lie in [0, 1), got {reject_fractions}")
    threshold = threshold_at_fmr(scores, issame, fmr)
    order = np.argsort(pair_quality, kind="stable")  # lowest quality first
    fnmr = np.empty(len(reject_fractions))
    for i, fraction in enumerate(reject_fractions):
        kept = order[round(fraction * len(scores)) :]
        genuine = scores[kept][issame[kept]]
        fnmr[i] = np.mean(genuine <= threshold) if genuine.size else np.nan
    valid = ~np.isnan(fnmr)
    auc = float(np.trapezoid(fnmr[valid], reject_fractions[valid])) if valid.sum() > 1 else 0.0
    return {"reject_fraction": reject_fractions, "fnmr": fnmr, "threshold": threshold, "auc": auc}


def random_rejection(
    scores: np.ndarray,
    issame: np.ndarray,
    fmr: float = 1e-3,
    reject_fractions: np.ndarray = DEFAULT_REJECT_FRACTIONS,
    draws: int = 20,
    seed: int = 0,
) -> dict[str, np.ndarray | float]:
    """The ERC of rejecting pairs in random order: the mean FNMR over `draws` seeded random
    qualities (same threshold, same format as `error_versus_reject`)."""
    rng = np.random.default_rng(seed)
    curves = [
        error_versus_reject(scores, issame, rng.random(len(scores)), fmr, reject_fractions)
        for _ in range(draws)
    ]
    fnmr = np.mean([c["fnmr"] for c in curves], axis=0)
    return {
        "reject_fraction": curves[0]["reject_fraction"],
        "fnmr": fnmr,
        "threshold": curves[0]["threshold"],
        "auc": float(np.mean([c["auc"] for c in curves])),
    }


def fnmr_at_reject(erc: dict, fraction: float) -> float:
    """FNMR of an ERC at the reject fraction closest to `fraction`."""
    index = int(np.argmin(np.abs(np.asarray(erc["reject_fraction"]) - fraction)))
    return float(erc["fnmr"][index])


def bootstrap_reject_difference(
    scores,
    issame,
    quality_a,
    quality_b,
    groups,
    fraction: float,
    fmr: float = 1e-3,
    draws: int = 200,
    seed: int = 0,
):
    """The 2.5 and 97.5 percentiles of FNMR(rejecting `fraction` by quality_a) - FNMR(... by
    quality_b) over `draws` bootstrap resamples: the genuine pairs resampled by `groups` (their
    identity: pairs of one identity share its faces, so they are drawn together), the impostor
    pairs one by one; the threshold is refitted to each resample. Below zero: a rejects better."""
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    genuine, impostors = np.flatnonzero(issame), np.flatnonzero(~issame)
    names, members = np.unique(np.asarray(groups)[genuine], return_inverse=True)
    by_group = [genuine[members == g] for g in range(len(names))]
    fractions = np.array([0.0, fraction])
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(draws):
        picked = np.concatenate(
            [by_group[g] for g in rng.integers(len(by_group), size=len(by_group))]
            + [rng.choice(impostors, len(impostors))]
        )
        s, same = scores[picked], issame[picked]
        fnmr_a = error_versus_reject(s, same, quality_a[picked], fmr, fractions)["fnmr"][1]
        fnmr_b = error_versus_reject(s, same, quality_b[picked], fmr, fractions)["fnmr"][1]
        differences.append(fnmr_a - fnmr_b)
    return float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties): Pearson's r of the ranks."""
    from scipy.stats import rankdata

    rx, ry = rankdata(np.asarray(x, np.float64)), rankdata(np.asarray(y, np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
    return float(np.sum(rx * ry) / denominator) if denominator > 0 else 0.0
