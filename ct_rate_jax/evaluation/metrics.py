"""Per-abnormality classification metrics at given thresholds, on numpy arrays.

Conventions shared with `thresholds.py` and `bootstrap.py`:

* ``labels``: float[N, C]; 1 = present, 0 = absent, anything else (-1, NaN) unknown.
  A row with an unknown label is left out of that class's metrics only (as
  `zero_shot.auroc_per_class` does).
* ``scores``: float[N, C]; higher means "more likely present" (e.g. P(present)).
* ``thresholds``: float[C]; volume n is called positive for class c when
  ``scores[n, c] >= thresholds[c]`` (scikit-learn's `roc_curve` convention, so a
  threshold read off `roc_curve` reproduces that ROC point exactly).

Per class, with TP, FP, TN, FN counted over the rows with a known label:

* ``auroc``: area under the ROC curve (`roc_auc_score`); threshold-free.
* ``average_precision``: sum_n (R_n - R_{n-1}) P_n over the PR curve
  (`average_precision_score`); threshold-free; NaN without positives.
* ``f1`` = 2 TP / (2 TP + FP + FN), the F1 of the "present" class.
* ``f1_two_class_weighted``: (P * F1_present + N * F1_absent) / (P + N) with
  F1_absent = 2 TN / (2 TN + FN + FP). This is what the original reports as F1
  (`f1_score(..., average="weighted")` on one abnormality's binary labels,
  scripts/bootstrap_values.py); the negative class dominates at low prevalence,
  so it is much higher than ``f1``. Kept only for comparison with the paper.
* ``accuracy`` = (TP + TN) / (P + N).
* ``precision`` = TP / (TP + FP); NaN when nothing is called positive.
* ``recall`` (sensitivity) = TP / (TP + FN).
* ``specificity`` = TN / (TN + FP).

Undefined values are NaN, never a silent 0 (scikit-learn's ``zero_division=np.nan``).
Averages over classes: ``macro`` = unweighted mean of the defined per-class values;
``weighted`` = mean weighted by support, the number of positives of each class
(scikit-learn's ``average="weighted"`` convention), again over defined values.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from sklearn.metrics import (average_precision_score, confusion_matrix,
                             precision_recall_fscore_support, roc_auc_score)

METRIC_NAMES: tuple[str, ...] = ("auroc", "average_precision", "f1", "f1_two_class_weighted",
                                 "accuracy", "precision", "recall", "specificity")
# Metrics that depend on the threshold (the rest are computed from the scores alone).
THRESHOLD_METRICS: tuple[str, ...] = METRIC_NAMES[2:]
AVERAGES: tuple[str, ...] = ("macro", "weighted")


def check_labels_scores(labels, scores, labels_name: str = "labels",
                        scores_name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """(float64[N, C] labels, float64[N, C] scores), with errors naming the bad argument."""
    labels = np.asarray(labels, np.float64)
    scores = np.asarray(scores, np.float64)
    if labels.ndim != 2:
        raise ValueError(f"{labels_name} must be [N, C], got shape {labels.shape}")
    if scores.shape != labels.shape:
        raise ValueError(f"{scores_name} must have the shape of {labels_name} "
                         f"{labels.shape}, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{scores_name} contains NaN or infinite values")
    return labels, scores


def check_thresholds(thresholds, num_classes: int) -> np.ndarray:
    thresholds = np.asarray(thresholds, np.float64)
    if thresholds.shape != (num_classes,):
        raise ValueError(f"thresholds must be [C] = [{num_classes}], got {thresholds.shape}")
    return thresholds


def known_mask(labels: np.ndarray) -> np.ndarray:
    """bool[N, C]: True where the label is 0 or 1."""
    return (labels == 0) | (labels == 1)


def average_over_classes(values: np.ndarray, support: np.ndarray, average: str | None):
    """Averages float[..., C] over the last axis, ignoring NaN entries.

    average: None (return unchanged), "macro" (plain mean) or "weighted" (by `support`,
    float[..., C] or float[C], the number of positives per class).  NaN where no
    class is defined (or, for "weighted", where the defined classes have no support).
    """
    if average is None:
        return values
    defined = ~np.isnan(values)
    if average == "macro":
        weights = defined.astype(np.float64)
    elif average == "weighted":
        weights = np.where(defined, np.broadcast_to(support, values.shape), 0.0)
    else:
        raise ValueError(f"average must be None, 'macro' or 'weighted', got {average!r}")
    total = weights.sum(-1)
    weighted_sum = (np.where(defined, values, 0.0) * weights).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weighted_sum / np.where(total > 0, total, 1.0), np.nan)


def metrics_from_confusion(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """The threshold metrics from (possibly fractional, e.g. bootstrap-weighted) counts.

    Arrays of any common shape in, same shape out; the definitions of the module
    docstring, NaN where a denominator is 0.  `classification_metrics` gets the same
    numbers from scikit-learn; the tests hold the two together.
    """
    tp, fp, tn, fn = (np.asarray(a, np.float64) for a in (tp, fp, tn, fn))

    def ratio(num, den):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    positives, negatives = tp + fn, tn + fp
    f1_present = ratio(2 * tp, 2 * tp + fp + fn)
    f1_absent = ratio(2 * tn, 2 * tn + fn + fp)
    return {
        "f1": f1_present,
        "f1_two_class_weighted": ratio(positives * f1_present + negatives * f1_absent,
                                       positives + negatives),
        "accuracy": ratio(tp + tn, positives + negatives),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, positives),
        "specificity": ratio(tn, negatives),
    }


@dataclasses.dataclass
class ClassificationMetrics:
    """Per-class metrics (`per_class[name]`: float[C]) with their averages.

    `protocol` says how the thresholds were chosen; it travels into `to_json` so that
    an optimistic number can never be mistaken for a held-out one.
    """

    names: list[str]
    protocol: str
    thresholds: np.ndarray  # float[C]
    per_class: dict[str, np.ndarray]  # metric -> float[C]
    positives: np.ndarray  # int[C], known labels == 1 (the support)
    negatives: np.ndarray  # int[C], known labels == 0
    confusion: np.ndarray  # int[C, 4]: TP, FP, TN, FN at the threshold

    @property
    def macro(self) -> dict[str, float]:
        return {m: float(average_over_classes(v, self.positives, "macro"))
                for m, v in self.per_class.items()}

    @property
    def weighted(self) -> dict[str, float]:
        return {m: float(average_over_classes(v, self.positives, "weighted"))
                for m, v in self.per_class.items()}

    def to_json(self) -> dict:
        def clean(x):
            return None if np.isnan(x) else float(x)
        return {
            "protocol": self.protocol,
            "per_class": {name: {"threshold": clean(self.thresholds[c]),
                                 "positives": int(self.positives[c]),
                                 "negatives": int(self.negatives[c]),
                                 **{m: clean(v[c]) for m, v in self.per_class.items()}}
                          for c, name in enumerate(self.names)},
            "macro": {m: clean(v) for m, v in self.macro.items()},
            "weighted": {m: clean(v) for m, v in self.weighted.items()},
        }

    def table(self, metrics: Sequence[str] = ("auroc", "f1", "accuracy", "precision",
                                              "recall", "specificity")) -> str:
        """Plain-text table: one row per class, then the macro and weighted rows."""
        width = max(len(n) for n in list(self.names) + ["weighted"])
        head = f"{'abnormality':<{width}}  {'pos':>5}  " + "  ".join(f"{m[:11]:>11}"
                                                                     for m in metrics)
        lines = [f"thresholds: {self.protocol}", head, "-" * len(head)]

        def cell(x):
            return f"{'n/a':>11}" if np.isnan(x) else f"{x:11.3f}"

        for c, name in enumerate(self.names):
            lines.append(f"{name:<{width}}  {int(self.positives[c]):>5}  "
                         + "  ".join(cell(self.per_class[m][c]) for m in metrics))
        lines.append("-" * len(head))
        for label, avg in (("macro", self.macro), ("weighted", self.weighted)):
            lines.append(f"{label:<{width}}  {'':>5}  "
                         + "  ".join(cell(avg[m]) for m in metrics))
        return "\n".join(lines)


def classification_metrics(labels, scores, thresholds, names: Sequence[str] | None = None,
                           protocol: str = "thresholds given by the caller"
                           ) -> ClassificationMetrics:
    """All metrics of the module docstring per class, using scikit-learn's primitives.

    Args:
      labels: float[N, C] with 1 / 0 / unknown (see module docstring).
      scores: float[N, C].
      thresholds: float[C]; positive call is ``score >= threshold``; a NaN threshold
        (e.g. a class with one label value where it was chosen) gives NaN threshold
        metrics for that class.
      names: C class names (default "class_0", ...).
      protocol: how the thresholds were chosen, recorded in the result.
    """
    labels, scores = check_labels_scores(labels, scores)
    num_classes = labels.shape[1]
    thresholds = check_thresholds(thresholds, num_classes)
    names = [f"class_{c}" for c in range(num_classes)] if names is None else list(names)
    if len(names) != num_classes:
        raise ValueError(f"names has {len(names)} entries, labels has {num_classes} classes")
    known = known_mask(labels)
    per_class = {m: np.full(num_classes, np.nan) for m in METRIC_NAMES}
    positives = np.zeros(num_classes, np.int64)
    negatives = np.zeros(num_classes, np.int64)
    confusion = np.zeros((num_classes, 4), np.int64)
    for c in range(num_classes):
        y = labels[known[:, c], c].astype(np.int64)
        s = scores[known[:, c], c]
        positives[c], negatives[c] = int(y.sum()), int(y.size - y.sum())
        if positives[c] and negatives[c]:
            per_class["auroc"][c] = roc_auc_score(y, s)
        if positives[c]:
            per_class["average_precision"][c] = average_precision_score(y, s)
        if y.size == 0 or np.isnan(thresholds[c]):
            continue
        predicted = (s >= thresholds[c]).astype(np.int64)
        tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()
        confusion[c] = tp, fp, tn, fn
        # labels=[0, 1] keeps both entries even when one value is absent; index 1 is
        # "present", and the recall of "absent" is the specificity.
        precision, recall, f1, support = precision_recall_fscore_support(
            y, predicted, labels=[0, 1], zero_division=np.nan)
        per_class["f1"][c] = f1[1]
        per_class["f1_two_class_weighted"][c] = (
            np.sum(f1 * support) / support.sum() if not np.isnan(f1).any() else np.nan)
        per_class["accuracy"][c] = (tp + tn) / y.size
        per_class["precision"][c] = precision[1]
        per_class["recall"][c] = recall[1]
        per_class["specificity"][c] = recall[0]
    return ClassificationMetrics(names, protocol, thresholds, per_class, positives,
                                 negatives, confusion)
