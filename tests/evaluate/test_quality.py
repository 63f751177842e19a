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


def test_quality_vs_resolution_pooled_and_per_face_rho():
    import jax
    import jax.numpy as jnp
    from scipy.stats import spearmanr

    from facemoe_jax.data import degrade
    from facemoe_jax.evaluate import embed
    from facemoe_jax.evaluate.recognizability import quality_vs_resolution

    # A stand-in quality: how much neighbouring pixels differ (falls as a face loses pixels),
    # plus a per-face offset from the first pixel, so faces also differ from each other.
    def roughness(images):
        x = np.asarray(images, np.float64)
        return np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3)) + x[:, 0, 0, 0]

    fn = embed.EmbedFn(
        jax.jit(
            lambda v, x: (
                jnp.abs(jnp.diff(x.astype(jnp.float32), axis=2)).mean(axis=(1, 2, 3))
                + x[:, 0, 0, 0].astype(jnp.float32)
            )
        )
    )
    faces = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    metrics, curve = quality_vs_resolution(fn, {}, faces, (4, 8, 32), 16, batch_size=4)
    pixels = [4, 8, 16]  # 32 is not below the input size: only the full size stays
    q = np.stack(
        [
            roughness(np.stack([degrade.to_resolution(f, p) for f in faces]) if p < 16 else faces)
            for p in pixels
        ],
        axis=1,
    )
    assert curve["pixels"] == pixels
    np.testing.assert_allclose(curve["mean"], q.mean(axis=0), rtol=1e-5)
    assert metrics["spearman_rho"] == pytest.approx(
        spearmanr(q.ravel(), np.tile(pixels, len(faces))).correlation, abs=1e-9
    )
    assert metrics["spearman_rho_per_face"] == pytest.approx(
        np.mean([spearmanr(row, pixels).correlation for row in q]), abs=1e-9
    )


def test_identity_pairs_hold_every_genuine_pair_once_and_as_many_impostors():
    from facemoe_jax.evaluate.recognizability import identity_pairs

    a, b, issame = identity_pairs(5, 4, seed=0)
    k = 4
    assert issame.sum() == 5 * 6 and (~issame).sum() == 5 * 6  # C(4, 2) per identity
    genuine = {(int(x), int(y)) for x, y in zip(a[issame], b[issame])}
    assert genuine == {
        (i * k + p, i * k + q) for i in range(5) for p in range(k) for q in range(p + 1, k)
    }
    assert np.all(a[~issame] // k != b[~issame] // k)  # impostors: two identities
    assert np.all((a < 20) & (b < 20))
    np.testing.assert_array_equal(identity_pairs(5, 4, seed=0)[1], b)  # seeded
    with pytest.raises(ValueError, match="1 x 4"):
        identity_pairs(1, 4, seed=0)


def test_quality_identity_set_with_the_norm_as_quality_equals_the_norm():
    """A quality function that returns the embedding norm must reject exactly as the norm
    does, on both the full-size and the mixed-resolution pairs."""
    import jax
    import jax.numpy as jnp

    from facemoe_jax.evaluate import embed
    from facemoe_jax.evaluate.recognizability import identity_pairs, quality_identity_set

    def features(x):
        x = x.astype(jnp.float32) / 255.0
        return jnp.stack(
            [
                x[..., 0].mean((1, 2)),
                x[..., 1].std((1, 2)) * 3,
                jnp.abs(jnp.diff(x, axis=1)).mean((1, 2, 3)) * 5,
            ],
            axis=1,
        )

    norm_fn = embed.EmbedFn(jax.jit(lambda v, x: jnp.linalg.norm(features(x), axis=1)))
    rng = np.random.default_rng(1)
    faces = rng.integers(0, 256, (12 * 3, 16, 16, 3), dtype=np.uint8)
    pairs = identity_pairs(12, 3, seed=0)
    metrics, curves = quality_identity_set(
        norm_fn,
        lambda images: np.asarray(features(jnp.asarray(images))),
        {},
        faces,
        pairs,
        3,
        (4, 8),
        16,
        fmr=0.05,
        batch_size=8,
    )
    assert metrics["pairs"] == 2 * 12 * 3
    for prefix in ("", "mixed_"):
        assert metrics[f"{prefix}fnmr_reject20_quality"] == metrics[f"{prefix}fnmr_reject20_norm"]
        assert metrics[f"{prefix}erc_auc_quality"] == pytest.approx(
            metrics[f"{prefix}erc_auc_norm"]
        )
    assert set(curves) >= {"as given: quality head", "mixed resolution: embedding norm"}


def test_bootstrap_interval_of_the_rejection_difference():
    """An oracle quality (the genuine score itself) against a random one: the interval lies
    below zero; a quality against itself: exactly zero."""
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(100), 6)
    issame = np.r_[np.ones(600, bool), np.zeros(600, bool)]
    scores = np.r_[rng.normal(0.5, 0.2, 600), rng.normal(0.0, 0.1, 600)]
    oracle = np.where(issame, scores, 1.0)  # rejects the weakest genuine pairs first
    noise = rng.random(1200)
    low, high = quality.bootstrap_reject_difference(
        scores, issame, oracle, noise, np.r_[groups, groups], 0.2, fmr=0.01, draws=50
    )
    assert low < high < 0
    assert quality.bootstrap_reject_difference(
        scores, issame, noise, noise, np.r_[groups, groups], 0.2, fmr=0.01, draws=5
    ) == (0.0, 0.0)
