"""Choosing per-class decision thresholds: the two protocols of issue 4.

(a) Optimistic, the original's: per class, the ROC point closest to (0, 1), chosen on
    the evaluation set itself (`youden_closest_thresholds`, `optimistic_metrics`).
    The threshold has seen the labels it is scored against, so F1, accuracy,
    precision, recall and specificity are biased upwards (most for rare classes,
    whose ROC curves have few points to pick from).  Reported only for comparison
    with the paper, and always labelled `PROTOCOL_OPTIMISTIC`.
(b) Held out: thresholds chosen on a validation split and applied unchanged to a
    separate test split (`validation_thresholds`, `validation_test_metrics`).
    Split by patient (`group_split`): CT-RATE has several reconstructions of each
    scan, and a volume-level split would leak near-duplicates across the splits.

A threshold t means "positive when score >= t" (see `metrics`).  A class with only
one label value among its known labels gets a NaN threshold.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from ct_rate_jax.evaluation.metrics import (ClassificationMetrics, check_labels_scores,
                                            classification_metrics, known_mask)

CRITERIA: tuple[str, ...] = ("closest", "youden", "f1")
CANDIDATES: tuple[str, ...] = ("roc", "grid")
PROTOCOL_OPTIMISTIC = ("optimistic: thresholds chosen on the evaluation set itself "
                       "(ROC point closest to (0,1), the original's protocol)")
PROTOCOL_VALIDATION = ("held-out: thresholds chosen on a separate validation split "
                       "({criterion}) and applied unchanged to the test split")
# The original's candidate thresholds (scripts/bootstrap_values.py, find_threshold).
ORIGINAL_GRID = np.linspace(0.0, 1.0, 100)


def _rates_on_roc(y: np.ndarray, s: np.ndarray):
    """Every ROC point: (thresholds, tpr, fpr), thresholds decreasing, first = +inf."""
    # drop_intermediate=False: the closest point to (0, 1) can be a vertex that
    # scikit-learn would drop as collinear.
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return thresholds, tpr, fpr


def _rates_on_grid(y: np.ndarray, s: np.ndarray):
    """The original's candidates: predict ``s > t`` for t on a 100-point grid in [0, 1].

    Returned as ``>=`` thresholds (the next float above t), so that our convention
    calls exactly the same volumes positive; ordered from the largest t down, so that
    "first best" picks the largest t among ties, as the original's ``<=`` does.
    """
    t = ORIGINAL_GRID[::-1]
    predicted = s[:, None] > t[None, :]
    tpr = predicted[y == 1].sum(0) / max(int((y == 1).sum()), 1)
    fpr = predicted[y == 0].sum(0) / max(int((y == 0).sum()), 1)
    return np.nextafter(t, np.inf), tpr, fpr


def _best_index(tpr, fpr, num_pos: int, num_neg: int, criterion: str) -> int:
    """Index of the best candidate; the first one on ties (= the largest threshold)."""
    if criterion == "closest":
        return int(np.argmin((1.0 - tpr) ** 2 + fpr ** 2))
    if criterion == "youden":
        return int(np.argmax(tpr - fpr))
    tp, fp = tpr * num_pos, fpr * num_neg
    return int(np.argmax(2 * tp / (tp + fp + num_pos)))  # F1 = 2TP / (2TP + FP + FN)


def select_thresholds(labels, scores, criterion: str = "closest",
                      candidates: str = "roc") -> np.ndarray:
    """float[C] per-class thresholds chosen on (labels, scores).

    Args:
      labels, scores: float[N, C] (unknown labels ignored per class).
      criterion: "closest" minimises sqrt((1 - TPR)^2 + FPR^2), the distance of the
        ROC point to the corner (0, 1) (the original's rule); "youden" maximises
        Youden's J = TPR - FPR; "f1" maximises the F1 of the present class.
      candidates: "roc" tries every distinct score (exact, all ROC points); "grid"
        the original's 100 evenly spaced values in [0, 1] with ``score > t``
        (reproduces its thresholds exactly; only for scores in [0, 1]).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
    labels, scores = check_labels_scores(labels, scores)
    known = known_mask(labels)
    thresholds = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        y = labels[known[:, c], c].astype(np.int64)
        s = scores[known[:, c], c]
        num_pos = int(y.sum())
        if num_pos == 0 or num_pos == y.size:
            continue
        rates = _rates_on_roc if candidates == "roc" else _rates_on_grid
        candidate, tpr, fpr = rates(y, s)
        thresholds[c] = candidate[_best_index(tpr, fpr, num_pos, y.size - num_pos,
                                              criterion)]
    return thresholds


def youden_closest_thresholds(labels, scores, candidates: str = "roc") -> np.ndarray:
    """Protocol (a), OPTIMISTIC: per class, the ROC point closest to (0, 1).

    float[C].  Meant to be chosen on the evaluation set itself, as the original does
    (scripts/bootstrap_values.py, `find_threshold`); see the module docstring for
    why that flatters every threshold metric.  Despite the name this is not
    Youden's J (max TPR - FPR, `select_thresholds(criterion="youden")`); the two
    coincide only on symmetric curves.  We differ from the original in trying every
    ROC point (``candidates="roc"``) instead of a 100-point grid; pass
    ``candidates="grid"`` to reproduce its thresholds exactly.
    """
    return select_thresholds(labels, scores, "closest", candidates)


def validation_thresholds(val_labels, val_scores, criterion: str = "closest",
                          candidates: str = "roc") -> np.ndarray:
    """Protocol (b): float[C] thresholds chosen on the validation split only.

    Apply them unchanged to the test split with `classification_metrics` (or use
    `validation_test_metrics`).  Same criteria as `select_thresholds`.
    """
    return select_thresholds(val_labels, val_scores, criterion, candidates)


def optimistic_metrics(labels, scores, names: Sequence[str] | None = None,
                       candidates: str = "roc") -> ClassificationMetrics:
    """Protocol (a) end to end: thresholds chosen on and applied to (labels, scores)."""
    thresholds = youden_closest_thresholds(labels, scores, candidates)
    return classification_metrics(labels, scores, thresholds, names, PROTOCOL_OPTIMISTIC)


def validation_test_metrics(val_labels, val_scores, test_labels, test_scores,
                            names: Sequence[str] | None = None,
                            criterion: str = "closest") -> ClassificationMetrics:
    """Protocol (b) end to end: thresholds from the validation split, metrics on test."""
    thresholds = validation_thresholds(val_labels, val_scores, criterion)
    return classification_metrics(test_labels, test_scores, thresholds, names,
                                  PROTOCOL_VALIDATION.format(criterion=criterion))


def group_split(groups: Sequence, test_fraction: float = 0.5, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(validation indices, test indices), int[.], splitting whole groups.

    Every row of a group lands on the same side, so pass patient ids (for CT-RATE,
    `data_pipeline.schema.parse_volume_name(name).patient_id`).  Groups are shuffled
    with `seed` and the test side takes groups until it holds at least
    ``test_fraction`` of the rows.  Indices are sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size < 2:
        raise ValueError(f"groups must be a 1-D sequence of at least 2 ids, got shape "
                         f"{groups.shape}")
    unique, inverse = np.unique(groups, return_inverse=True)
    if unique.size < 2:
        raise ValueError("groups holds a single group; nothing to split")
    order = np.random.default_rng(seed).permutation(unique.size)
    sizes = np.bincount(inverse, minlength=unique.size)[order]
    # Groups (in shuffled order) go to test until the target is reached; at least one
    # group stays on each side.
    num_test = int(np.searchsorted(np.cumsum(sizes), test_fraction * groups.size) + 1)
    num_test = min(max(num_test, 1), unique.size - 1)
    is_test_group = np.zeros(unique.size, bool)
    is_test_group[order[:num_test]] = True
    is_test = is_test_group[inverse]
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
