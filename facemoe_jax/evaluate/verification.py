"""Pair verification metrics with the insightface protocol (LFW, CFP-FP, AgeDB-30, ...).

Given ``N`` pairs of embeddings and whether each pair shows the same person:

* ``ten_fold_accuracy``: squared L2 distance of the L2-normalised embeddings; a pair is
  predicted "same" when ``distance < threshold`` (strict); thresholds 0, 0.01, ..., 3.99; the
  pairs are cut into 10 contiguous folds in order (sklearn ``KFold(10, shuffle=False)``: the
  first ``N % 10`` folds get one extra pair); for each fold the *first* threshold with the best
  accuracy on the other nine folds is applied to it. Reported: mean and std (ddof 0) of the ten
  held-out accuracies, and the mean of the ten chosen thresholds. ``folds=`` gives the folds
  instead (LFW's pairs.txt states its own: `evaluate/lfw.py`); ``thresholds="exact"`` the best
  cut between the training folds' own distances (`exact_threshold`) instead of the grid. A fold
  holding one class only (pairs grouped by class) draws one warning: the accuracy and its std
  then mean little.
* ``exact_threshold``: the best cut between one set's own distances (LFW View 1: chosen on
  the training pairs, applied to the test pairs); ``grid_threshold``: the grid's first best.
* ``tar_at_far``: true-accept rate at a false-accept rate, with the insightface IJB rule (on
  the sklearn-style ROC, the TPR of the point whose FPR is nearest the target; see its
  docstring).

Everything here is NumPy (float64): evaluation runs once per epoch on a few thousand pairs.
"""

from __future__ import annotations

import numpy as np

from facemoe_jax.core import messages

DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)
_WARNED: set[str] = set()  # one-class fold warnings already given (a sweep repeats the pairs)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def pair_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """(N,) squared L2 distance between L2-normalised rows of emb1 and emb2 (both (N, D)).

    Lies in [0, 4]; equals ``2 - 2 * cosine``.
    """
    emb1, emb2 = np.asarray(emb1), np.asarray(emb2)
    if emb1.ndim != 2 or emb1.shape != emb2.shape:
        raise ValueError(
            f"emb1 and emb2 must both be (N, D) of the same shape, got {emb1.shape} and "
            f"{emb2.shape}"
        )
    if emb1.shape[0] == 0:
        raise ValueError(f"no pairs to compare: emb1 has shape {emb1.shape}")
    diff = _l2_normalize(emb1) - _l2_normalize(emb2)
    return np.sum(diff * diff, axis=1)


def _check_pairs(values: np.ndarray, issame: np.ndarray, name: str) -> None:
    if values.ndim != 1 or issame.ndim != 1 or values.shape[0] != issame.shape[0]:
        raise ValueError(
            f"{name} and issame must be 1-D of equal length, got shapes {values.shape} and "
            f"{issame.shape}"
        )
    if values.shape[0] == 0:
        raise ValueError(f"{name} and issame are empty (0 pairs)")


def contiguous_folds(num_pairs: int, num_folds: int) -> list[np.ndarray]:
    """Index arrays of ``num_folds`` contiguous folds, sizes as sklearn's unshuffled KFold."""
    return np.array_split(np.arange(num_pairs), num_folds)


def _given_folds(folds, num_pairs: int) -> list[np.ndarray]:
    """Index arrays of the pairs of each distinct label of ``folds`` ((N,) ints), in label order."""
    folds = np.asarray(folds)
    if folds.shape != (num_pairs,) or folds.dtype.kind not in "iu":
        raise ValueError(
            f"folds must be ({num_pairs},) integers (one fold label per pair), got "
            f"{folds.dtype} {folds.shape}"
        )
    labels = np.unique(folds)
    if len(labels) < 2:
        raise ValueError(f"folds must hold at least 2 distinct labels, got {labels.tolist()}")
    return [np.flatnonzero(folds == label) for label in labels]


def _warn_one_class_folds(folds: list[np.ndarray], issame: np.ndarray, contiguous: bool) -> None:
    one_class = [
        f"{f} ({'same' if issame[idx[0]] else 'different'})"
        for f, idx in enumerate(folds)
        if issame[idx].all() or not issame[idx].any()
    ]
    if not one_class:
        return
    how = (
        f"the {len(folds)} folds are contiguous runs of the pairs in order, and insightface's "
        "verification has the same flaw, so pairs grouped by class (all same, then all "
        "different) make one-class folds"
        if contiguous
        else "the given folds group the pairs by class"
    )
    message = (
        f"k-fold verification of {len(issame)} pairs: fold(s) {', '.join(one_class)} hold only "
        f"one class of pair: {how}; their thresholds and accuracies mean little. Interleave the "
        "pairs as LFW's pairs.txt does (every fold of 600 holds 300 same and 300 different pairs)."
    )
    if message not in _WARNED:
        _WARNED.add(message)
        messages.warning(message)


def _correct_counts(distances, issame, thresholds, idx) -> np.ndarray:
    """(T,) pairs of `idx` classified correctly at each threshold ("same" = distance < t)."""
    return np.sum((distances[None, idx] < thresholds[:, None]) == issame[None, idx], axis=1)


def grid_threshold(
    distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray | None = None
) -> float:
    """The first threshold with the best accuracy on these pairs (each fold's rule in
    ``ten_fold_accuracy``: "same" when ``distance < threshold``; default 0..3.99 step 0.01)."""
    distances = np.asarray(distances, np.float64)
    issame = np.asarray(issame, bool)
    _check_pairs(distances, issame, "distances")
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, np.float64)
    correct = _correct_counts(distances, issame, thresholds, np.arange(len(distances)))
    return float(thresholds[int(np.argmax(correct))])  # argmax returns the first maximum


def exact_threshold(distances: np.ndarray, issame: np.ndarray) -> float:
    """The threshold with the best accuracy on these pairs, searched over every cut between their
    own sorted distances ("same" when ``distance < threshold``); among equally good cuts the most
    accepting. LFW View 1 chooses its threshold this way on pairsDevTrain.txt (the figures of
    ../shared/realfaces/README.md); the returned value is just above the last accepted distance
    (all pairs rejected: the smallest distance)."""
    distances = np.asarray(distances, np.float64)
    issame = np.asarray(issame, bool)
    _check_pairs(distances, issame, "distances")
    order = np.argsort(distances, kind="stable")
    sorted_distances, sorted_same = distances[order], issame[order]
    # Cut k accepts the pairs before run_ends[k - 1] (cut 0 accepts none); equal distances move
    # together, as a threshold cannot split them.
    run_ends = np.r_[np.flatnonzero(np.diff(sorted_distances)) + 1, len(sorted_distances)]
    accepted = np.r_[0, run_ends]
    same_accepted = np.r_[0, np.cumsum(sorted_same)[run_ends - 1]]
    different_rejected = int((~issame).sum()) - (accepted - same_accepted)
    correct = same_accepted + different_rejected
    cut = len(correct) - 1 - int(np.argmax(correct[::-1]))  # the last (most accepting) best
    if cut == 0:
        return float(sorted_distances[0])
    return float(np.nextafter(sorted_distances[run_ends[cut - 1] - 1], np.inf))


def ten_fold_accuracy(
    distances: np.ndarray,
    issame: np.ndarray,
    thresholds: np.ndarray | str | None = None,
    num_folds: int = 10,
    folds: np.ndarray | None = None,
) -> dict[str, float]:
    """insightface's k-fold verification accuracy (see the module docstring for the protocol).

    Args:
      distances: (N,) pair distances (smaller = more alike), N >= num_folds.
      issame: (N,) bools.
      thresholds: candidate thresholds in increasing order; default 0..3.99 step 0.01;
        "exact": each fold's threshold is `exact_threshold` of the other folds' pairs.
      num_folds: the number of contiguous folds when `folds` is None.
      folds: (N,) integer fold label of each pair (e.g. the sets of LFW's pairs.txt), instead
        of contiguous folds; folds are taken in label order.
    Returns:
      {"accuracy": mean held-out accuracy, "accuracy_std": its std (ddof 0),
       "best_threshold": mean of the per-fold chosen thresholds}.
    """
    distances = np.asarray(distances, np.float64)
    issame = np.asarray(issame, bool)
    _check_pairs(distances, issame, "distances")
    num_pairs = distances.shape[0]
    if folds is None:
        if num_pairs < num_folds:
            raise ValueError(f"need at least num_folds={num_folds} pairs, got {num_pairs}")
        fold_indices = contiguous_folds(num_pairs, num_folds)
    else:
        fold_indices = _given_folds(folds, num_pairs)
    _warn_one_class_folds(fold_indices, issame, contiguous=folds is None)
    num_folds = len(fold_indices)
    if isinstance(thresholds, str):
        if thresholds != "exact":
            raise ValueError(f"thresholds={thresholds!r}: an array of candidates or 'exact'")
        return _exact_k_fold(distances, issame, fold_indices)
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, np.float64)

    # correct_per_fold[j, f]: pairs of fold f classified correctly at thresholds[j].
    correct_per_fold = np.stack(
        [_correct_counts(distances, issame, thresholds, idx) for idx in fold_indices], axis=1
    )
    fold_sizes = np.array([len(idx) for idx in fold_indices])
    total_correct = correct_per_fold.sum(axis=1)

    held_out_accuracies = np.empty(num_folds)
    chosen_thresholds = np.empty(num_folds)
    for f in range(num_folds):
        train_accuracy = (total_correct - correct_per_fold[:, f]) / (num_pairs - fold_sizes[f])
        best = int(np.argmax(train_accuracy))  # argmax returns the first maximum
        chosen_thresholds[f] = thresholds[best]
        held_out_accuracies[f] = correct_per_fold[best, f] / fold_sizes[f]
    return {
        "accuracy": float(np.mean(held_out_accuracies)),
        "accuracy_std": float(np.std(held_out_accuracies)),
        "best_threshold": float(np.mean(chosen_thresholds)),
    }


def _exact_k_fold(distances, issame, fold_indices) -> dict[str, float]:
    accuracies, chosen = [], []
    for idx in fold_indices:
        train = np.ones(len(distances), bool)
        train[idx] = False
        chosen.append(exact_threshold(distances[train], issame[train]))
        accuracies.append(np.mean((distances[idx] < chosen[-1]) == issame[idx]))
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "best_threshold": float(np.mean(chosen)),
    }


def roc_curve(
    scores: np.ndarray, labels: np.ndarray, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC like ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=...)``.

    One point per distinct score, from the highest threshold down: at threshold t a pair is
    accepted when ``score >= t``. With ``drop_intermediate`` (sklearn's default, which
    insightface's IJB evaluation uses) points in the middle of straight horizontal or vertical
    runs are removed (where the second differences of both the false- and true-positive counts
    are 0). Then a first point (0, 0) with threshold +inf is prepended (sklearn >= 1.3).

    Args:
      scores: (N,) similarity (higher = more alike). labels: (N,) bools, True = same.
    Returns:
      (fpr, tpr, thresholds), equal-length 1-D arrays, thresholds decreasing.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    _check_pairs(scores, labels, "scores")
    num_positive = int(labels.sum())
    num_negative = labels.shape[0] - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError(
            f"ROC needs both classes, got {num_positive} positive and {num_negative} negative pairs"
        )
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # Last index of every run of equal scores: the ROC moves only once per distinct score.
    run_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.shape[0] - 1]
    true_positives = np.cumsum(sorted_labels)[run_ends]
    false_positives = run_ends + 1 - true_positives
    thresholds = sorted_scores[run_ends]
    if drop_intermediate and len(true_positives) > 2:
        bends = np.logical_or(np.diff(false_positives, 2), np.diff(true_positives, 2))
        keep = np.flatnonzero(np.r_[True, bends, True])
        true_positives, false_positives = true_positives[keep], false_positives[keep]
        thresholds = thresholds[keep]
    fpr = np.r_[0.0, false_positives / num_negative]
    tpr = np.r_[0.0, true_positives / num_positive]
    return fpr, tpr, np.r_[np.inf, thresholds]


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> float:
    """True-accept rate at a false-accept rate, insightface IJB rule.

    From ``roc_curve`` (with ``drop_intermediate=True``, as insightface calls sklearn), take the
    TPR of the point whose FPR is nearest ``far`` (absolute difference). insightface flips the
    ROC and takes the first minimum of ``(|fpr - far|, index)``; in ROC order that is the *last*
    nearest point, so among equally near points (several ROC points at one FPR, or two FPRs
    equally far from the target) the one with the highest TPR wins. The chosen point's FPR may
    be above ``far``: this is "nearest", not "at most".

    Args:
      scores: (N,) similarities. issame: (N,) bools. far: target false-accept rate.
    Returns:
      The TAR, a float in [0, 1].
    """
    fpr, tpr, _ = roc_curve(scores, issame)
    distance_to_target = np.abs(fpr - far)
    last_nearest = len(fpr) - 1 - int(np.argmin(distance_to_target[::-1]))
    return float(tpr[last_nearest])


def verification_metrics(
    emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray
) -> dict[str, float]:
    """All verification numbers for one pair set.

    Returns {"accuracy", "accuracy_std", "best_threshold"} from ``ten_fold_accuracy`` on squared
    L2 distances, and "tar@far=1e-3" from ``tar_at_far`` on cosine similarity ``1 - d / 2``.
    """
    issame = np.asarray(issame, bool)
    distances = pair_distances(emb1, emb2)
    metrics = ten_fold_accuracy(distances, issame)
    metrics["tar@far=1e-3"] = tar_at_far(1.0 - distances / 2.0, issame, 1e-3)
    return metrics
