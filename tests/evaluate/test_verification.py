"""insightface verification protocol: k-fold accuracy, ROC and TAR@FAR."""

import numpy as np
import pytest

from facemoe_jax.evaluate import verification
from facemoe_jax.evaluate.verification import (
    contiguous_folds,
    exact_threshold,
    grid_threshold,
    pair_distances,
    roc_curve,
    tar_at_far,
    ten_fold_accuracy,
    verification_metrics,
)


def _brute_force_ten_fold(distances, issame, num_folds=10):
    """Straight transcription of the protocol, one Python loop per fold and per threshold."""
    thresholds = np.arange(0, 4, 0.01)
    n = len(distances)
    fold_sizes = [n // num_folds + (1 if f < n % num_folds else 0) for f in range(num_folds)]
    starts = np.cumsum([0] + fold_sizes)
    accuracies, chosen = [], []
    for f in range(num_folds):
        test = np.arange(starts[f], starts[f + 1])
        train = np.setdiff1d(np.arange(n), test)
        best_acc, best_thr = -1.0, None
        for thr in thresholds:
            pred = distances[train] < thr
            acc = np.mean(pred == issame[train])
            if acc > best_acc:  # strict: keeps the first maximiser
                best_acc, best_thr = acc, thr
        chosen.append(best_thr)
        accuracies.append(np.mean((distances[test] < best_thr) == issame[test]))
    return np.mean(accuracies), np.std(accuracies), np.mean(chosen)


@pytest.mark.parametrize("num_pairs", [600, 603])
def test_ten_fold_matches_brute_force(num_pairs):
    rng = np.random.default_rng(num_pairs)
    issame = rng.random(num_pairs) < 0.5
    # Same pairs near 0.9, different pairs near 1.5: overlapping, so folds disagree a little.
    distances = np.where(issame, rng.normal(0.9, 0.3, num_pairs), rng.normal(1.5, 0.3, num_pairs))
    distances = np.clip(distances, 0, 4)
    distances[:20] = np.round(distances[:20], 2)  # values exactly on thresholds: strict "<"
    result = ten_fold_accuracy(distances, issame)
    accuracy, std, threshold = _brute_force_ten_fold(distances, issame)
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert result["best_threshold"] == pytest.approx(threshold, abs=1e-12)
    assert 0.75 < result["accuracy"] < 0.97 and result["accuracy_std"] > 0


def test_perfectly_separable_pairs():
    issame = np.array([True, False] * 50)
    distances = np.where(issame, 0.5, 2.0)
    result = ten_fold_accuracy(distances, issame)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    # First threshold with 0.5 < t is 0.51 (strict comparison: 0.50 itself misclassifies).
    assert result["best_threshold"] == pytest.approx(0.51)


def test_ten_fold_on_hand_made_folds():
    # 2 folds of 2 pairs. Fold 0: (d=0.2 same, d=0.3 diff); fold 1: (0.25 same, 1.0 diff).
    # Held-out fold 0, trained on fold 1: first t with 0.25 < t <= 1.0 is 0.26; on fold 0 it
    # accepts 0.2 and rejects 0.3 -> 1.0. Held-out fold 1, trained on fold 0: first t in
    # (0.2, 0.3] is 0.21; on fold 1 it rejects the same pair at 0.25 -> 0.5.
    result = ten_fold_accuracy(
        np.array([0.2, 0.3, 0.25, 1.0]), np.array([True, False, True, False]), num_folds=2
    )
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["accuracy_std"] == pytest.approx(0.25)
    assert result["best_threshold"] == pytest.approx((0.26 + 0.21) / 2)


# Scores from most to least similar; P = 4 positives, N = 4 negatives.
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
LABELS = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)


def test_roc_curve_by_hand():
    fpr, tpr, thr = roc_curve(SCORES[::-1], LABELS[::-1], drop_intermediate=False)  # any order
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.25, 0.25, 0.5, 0.75, 0.75, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    # sklearn's default drops (0.5, 0.75), in the middle of the flat run 0.25 -> 0.75. The
    # first and last score points are always kept; the origin is prepended after dropping.
    fpr, tpr, thr = roc_curve(SCORES, LABELS)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.25, 0.25, 0.75, 0.75, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2])


def test_roc_curve_tied_scores_move_once():
    fpr, tpr, thr = roc_curve(np.array([0.9, 0.5, 0.9, 0.5]), np.array([1, 1, 0, 0], bool))
    np.testing.assert_allclose(fpr, [0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5])


@pytest.mark.parametrize(
    "far,tar",
    [
        (0.0, 0.5),  # FPR 0 at three points: the last (highest TPR) wins
        (0.25, 0.75),
        (0.4, 0.75),  # nearest FPR is 0.25
        (0.5, 1.0),  # 0.25 and 0.75 equally near: the later point, (0.75, 1.0)
        (0.6, 1.0),
        (1e-3, 0.5),
    ],
)
def test_tar_at_far_nearest_fpr_rule(far, tar):
    assert tar_at_far(SCORES, LABELS, far) == tar


def test_pair_distances_and_metrics():
    emb1 = np.array([[3.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    emb2 = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    np.testing.assert_allclose(pair_distances(emb1, emb2), [0.0, 2.0, 4.0], atol=1e-12)

    rng = np.random.default_rng(7)
    emb1, emb2 = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    issame = rng.random(200) < 0.5
    emb2[issame] = emb1[issame] + 0.5 * emb2[issame]  # same pairs are correlated
    cos = np.sum(emb1 * emb2, 1) / (np.linalg.norm(emb1, axis=1) * np.linalg.norm(emb2, axis=1))
    distances = pair_distances(emb1, emb2)
    np.testing.assert_allclose(distances, 2 - 2 * cos, atol=1e-12)
    metrics = verification_metrics(emb1, emb2, issame)
    assert set(metrics) == {"accuracy", "accuracy_std", "best_threshold", "tar@far=1e-3"}
    expected = ten_fold_accuracy(2 - 2 * cos, issame)
    for key in expected:
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["tar@far=1e-3"] == tar_at_far(cos, issame, 1e-3)
    assert metrics["accuracy"] > 0.9


def test_error_cases_name_the_sizes():
    with pytest.raises(ValueError, match=r"\(5,\).*\(6,\)"):
        ten_fold_accuracy(np.zeros(5), np.zeros(6, bool), num_folds=2)
    with pytest.raises(ValueError, match="0 pairs"):
        ten_fold_accuracy(np.zeros(0), np.zeros(0, bool))
    with pytest.raises(ValueError, match=r"10.*9"):
        ten_fold_accuracy(np.zeros(9), np.zeros(9, bool))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        pair_distances(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(0, 4\)"):
        pair_distances(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        tar_at_far(np.zeros(3), np.zeros(4, bool), 1e-3)
    with pytest.raises(ValueError, match="0 negative"):
        tar_at_far(np.ones(3), np.ones(3, bool), 1e-3)
    with pytest.raises(ValueError, match=r"\(20,\).*\(19,\)"):
        verification_metrics(np.ones((20, 2)), np.ones((20, 2)), np.ones(19, bool))


def test_given_folds_match_brute_force():
    # Folds given per pair (LFW's pairs.txt sets), here scattered and of unequal sizes.
    rng = np.random.default_rng(3)
    issame = np.arange(90) % 2 == 0
    distances = np.clip(np.where(issame, rng.normal(0.9, 0.3, 90), rng.normal(1.5, 0.3, 90)), 0, 4)
    folds = rng.integers(0, 3, 90) + 5  # labels 5, 6, 7
    grid = np.arange(0, 4, 0.01)
    accuracies, chosen = [], []
    for f in (5, 6, 7):
        train, test = folds != f, folds == f
        t = grid[int(np.argmax([np.mean((distances[train] < t) == issame[train]) for t in grid]))]
        chosen.append(t)
        accuracies.append(np.mean((distances[test] < t) == issame[test]))
    result = ten_fold_accuracy(distances, issame, folds=folds)
    assert result["accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    assert result["accuracy_std"] == pytest.approx(np.std(accuracies), abs=1e-12)
    assert result["best_threshold"] == pytest.approx(np.mean(chosen), abs=1e-12)
    # Contiguous labels give the contiguous protocol.
    labels = np.concatenate(
        [np.full(len(idx), f) for f, idx in enumerate(contiguous_folds(90, 10))]
    )
    assert ten_fold_accuracy(distances, issame, folds=labels) == ten_fold_accuracy(
        distances, issame
    )
    with pytest.raises(ValueError, match=r"\(90,\) integers"):
        ten_fold_accuracy(distances, issame, folds=folds[:89])
    with pytest.raises(ValueError, match="2 distinct"):
        ten_fold_accuracy(distances, issame, folds=np.zeros(90, int))


def test_exact_threshold_matches_brute_force():
    rng = np.random.default_rng(4)
    for n in (1, 7, 200):
        issame = rng.random(n) < 0.5
        distances = np.round(np.where(issame, rng.normal(0.9, 0.4, n), rng.normal(1.4, 0.4, n)), 1)
        # Brute force: every candidate (each distance, accepted with <=; or none accepted), the
        # most accepting of the best.
        candidates = np.r_[-np.inf, np.unique(distances)]
        accuracy = [np.mean((distances <= c) == issame) for c in candidates]
        best = candidates[len(accuracy) - 1 - int(np.argmax(accuracy[::-1]))]
        t = exact_threshold(distances, issame)
        np.testing.assert_array_equal(distances < t, distances <= best)
    assert exact_threshold(np.array([0.2, 0.3, 0.25, 1.0]), np.array([1, 0, 1, 0], bool)) == (
        np.nextafter(0.25, 1)
    )
    assert exact_threshold(np.array([0.5, 0.1]), np.array([False, True])) == np.nextafter(0.1, 1)
    # A tie (none or both accepted: 1 correct) goes to the most accepting cut.
    assert exact_threshold(np.array([0.5, 0.1]), np.array([True, False])) == np.nextafter(0.5, 1)
    assert exact_threshold(np.array([0.5, 0.1]), np.array([False, False])) == 0.1  # none accepted


def test_grid_threshold_is_the_first_best_on_the_grid():
    distances, issame = np.array([0.2, 0.3, 0.25, 1.0]), np.array([True, False, True, False])
    assert grid_threshold(distances, issame) == pytest.approx(0.26)  # first t in (0.25, 0.3]
    assert grid_threshold(distances, issame, thresholds=np.array([0.1, 0.5])) == 0.5


def test_exact_thresholds_in_k_fold_match_brute_force():
    rng = np.random.default_rng(5)
    issame = np.arange(120) % 2 == 0
    distances = np.where(issame, rng.normal(0.9, 0.4, 120), rng.normal(1.4, 0.4, 120))
    folds = np.arange(120) // 40
    accuracies, chosen = [], []
    for f in range(3):
        train, test = folds != f, folds == f
        candidates = np.r_[-np.inf, np.sort(distances[train])]
        accuracy = [np.mean((distances[train] <= c) == issame[train]) for c in candidates]
        cut = candidates[len(accuracy) - 1 - int(np.argmax(accuracy[::-1]))]
        chosen.append(cut)
        accuracies.append(np.mean((distances[test] <= cut) == issame[test]))
    result = ten_fold_accuracy(distances, issame, thresholds="exact", folds=folds)
    assert result["accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    assert result["accuracy_std"] == pytest.approx(np.std(accuracies), abs=1e-12)
    assert result["best_threshold"] == pytest.approx(np.mean(chosen), abs=1e-9)
    # At least as good on the training folds as the grid, so usually a little different.
    assert result != ten_fold_accuracy(distances, issame, folds=folds)
    with pytest.raises(ValueError, match="'exact'"):
        ten_fold_accuracy(distances, issame, thresholds="best")


def test_one_class_folds_draw_one_warning(capsys, monkeypatch):
    monkeypatch.setattr(verification, "_WARNED", set())
    rng = np.random.default_rng(0)
    distances = rng.uniform(0, 2, 100)
    grouped = np.arange(100) < 50  # all same pairs, then all different: folds 0-4 vs 5-9
    ten_fold_accuracy(distances, grouped)
    ten_fold_accuracy(distances[::-1], grouped)  # the same pairs again (a sweep): said once
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    for words in ("0 (same)", "9 (different)", "contiguous", "insightface", "Interleave"):
        assert words in lines[0]
    ten_fold_accuracy(distances, np.arange(100) % 2 == 0)  # interleaved: no warning
    ten_fold_accuracy(distances, grouped, folds=np.arange(100) % 2)  # given folds, both classes
    assert capsys.readouterr().err == ""
    ten_fold_accuracy(distances, grouped, folds=(np.arange(100) >= 50).astype(int))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "given folds" in lines[0] and "contiguous" not in lines[0]
