"""Error-versus-reject curves, checked on a set small enough to compute by hand."""

import numpy as np
import pytest

from facemoe_jax.evaluate import quality


def test_error_versus_reject_by_hand():
    # 4 impostors (scores 0.1 0.2 0.3 0.4) and 6 genuine pairs; fmr 0.25 -> threshold = the
    # 0.75 quantile ('higher') of impostors = 0.4 (a pair matches when score > 0.4).
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.9, 0.45, 0.4, 0.8, 0.7])
    issame = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], bool)
    # Genuine misses (score <= 0.4): pairs 4 (0.35) and 7 (0.40). Qualities put them first.
    pair_quality = np.array([5, 6, 7, 8, 1, 9, 4, 2, 9, 9], float)
    erc = quality.error_versus_reject(
        scores, issame, pair_quality, fmr=0.25, reject_fractions=[0.0, 0.1, 0.2, 0.3]
    )
    assert erc["threshold"] == 0.4
    # r=0: 2 of 6 genuine fail. r=0.1 drops pair 4: 1/5. r=0.2 also drops pair 7: 0/4.
    # r=0.3 also drops pair 6 (quality 4, a success): 0/3.
    np.testing.assert_allclose(erc["fnmr"], [2 / 6, 1 / 5, 0, 0])
    expected_auc = 0.1 * ((2 / 6 + 1 / 5) / 2 + (1 / 5 + 0) / 2 + 0)
    assert erc["auc"] == pytest.approx(expected_auc)


def test_quality_from_embedding_norms_and_errors():
    np.testing.assert_allclose(
        quality.embedding_norm_quality(np.array([[3.0, 4.0], [0.0, 1.0]])), [5.0, 1.0]
    )
    with pytest.raises(ValueError, match="impostor"):
        quality.threshold_at_fmr(np.ones(3), np.ones(3, bool), 1e-3)
    with pytest.raises(ValueError, match=r"\(3,\).*\(3,\).*\(2,\)"):
        quality.error_versus_reject(np.ones(3), np.zeros(3, bool), np.ones(2))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        quality.error_versus_reject(np.ones(3), np.zeros(3, bool), np.ones(3), 0.1, [0.0, 1.0])


def test_spearman_rho_matches_the_rank_formula_with_ties():
    x = np.array([0.1, 0.4, 0.4, 0.9, 0.3, 0.7])
    y = np.array([8, 12, 12, 48, 8, 24])
    # Average ranks by hand (ties share the mean of their places), then Pearson's r.
    rx = np.array([1, 3.5, 3.5, 6, 2, 5])
    ry = np.array([1.5, 3.5, 3.5, 6, 1.5, 5])
    want = np.corrcoef(rx, ry)[0, 1]
    assert quality.spearman_rho(x, y) == pytest.approx(want, rel=1e-12)
    assert quality.spearman_rho(x, -y) == pytest.approx(-want, rel=1e-12)


def test_random_rejection_keeps_the_error_on_average_and_fnmr_at_reject():
    rng = np.random.default_rng(0)
    issame = np.repeat([True, False], 500)
    scores = np.where(issame, rng.normal(0.5, 0.2, 1000), rng.normal(0.0, 0.1, 1000))
    erc = quality.random_rejection(scores, issame, fmr=1e-2, draws=30, seed=1)
    # Random rejection removes genuine pairs of every score alike: the FNMR stays where it was.
    np.testing.assert_allclose(erc["fnmr"][:10], erc["fnmr"][0], atol=0.03)
    assert quality.fnmr_at_reject(erc, 0.2) == erc["fnmr"][4]  # fractions 0, 0.05, ... 0.2
