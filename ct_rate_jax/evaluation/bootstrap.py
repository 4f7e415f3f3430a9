"""Percentile-bootstrap confidence intervals that really resample volumes.

Resample b draws N row indices with replacement (`resample_indices`); the same draw
serves every class and, for a given seed, every metric, so intervals of different
metrics (and the per-class and averaged ones) come from the same resamples.  A
resample is skipped for a class when that class has a single label value in it
(AUROC and friends are undefined there); for an averaged metric it is skipped when
any class that has both values in the full data loses one.  The interval is the
(alpha/2, 1 - alpha/2) quantile (numpy's linear interpolation) of the used
resamples; the point estimate is the metric on the full data, not the bootstrap mean.

The original (scripts/bootstrap_values.py) draws indices and then evaluates the full,
unresampled arrays 1000 times (``sampled_labels = labels``), so its "intervals" have
zero width; its `compute_cis` also reports the bootstrap mean, rounds to 4 places and
takes order statistics at int(alpha/2 * n) - 1.

Speed: metrics that implement ``on_counts`` (`auroc_metric`, `threshold_metric`) are
evaluated for a block of resamples at once from the count of each row in each
resample; any other callable is called once per resample on the resampled rows.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ct_rate_jax.evaluation import zero_shot
from ct_rate_jax.evaluation.metrics import (THRESHOLD_METRICS, average_over_classes,
                                            check_labels_scores, check_thresholds,
                                            classification_metrics, known_mask,
                                            metrics_from_confusion)

_BLOCK = 128  # resamples evaluated together: float64[128, N] blocks stay small.


def resample_indices(num_rows: int, n_resamples: int, seed: int) -> np.ndarray:
    """int[B, N]: row indices drawn uniformly with replacement, B = n_resamples."""
    return np.random.default_rng(seed).integers(0, num_rows, size=(n_resamples, num_rows))


def _counts(indices: np.ndarray, num_rows: int) -> np.ndarray:
    """float[B, N]: how often each row appears in each resample."""
    offsets = indices + num_rows * np.arange(len(indices))[:, None]
    return np.bincount(offsets.ravel(), minlength=len(indices) * num_rows
                       ).reshape(len(indices), num_rows).astype(np.float64)


def weighted_auroc(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float[B]: AUROC of one class with row weights float[B, N] (counts in a resample).

    AUROC = sum over (positive p, negative q) pairs of w_p w_q ([s_p > s_q] +
    0.5 [s_p = s_q]) / (W_pos W_neg), the Mann-Whitney form, which equals
    scikit-learn's `roc_auc_score` on the resampled rows.  Rows with y not in {0, 1}
    must have weight 0.  NaN where W_pos or W_neg is 0.
    """
    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    w = weights[:, order]
    # Tied scores form one group: a positive beats half of the tied negatives.
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    pos = np.add.reduceat(w * (y_sorted == 1), starts, axis=1)
    neg = np.add.reduceat(w * (y_sorted == 0), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(1)
    total = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)


@dataclasses.dataclass(frozen=True, eq=False)
class AurocMetric:
    """AUROC per class (average=None, float[C]) or averaged ("macro"/"weighted")."""

    average: str | None = None

    def __call__(self, labels, scores):
        labels, scores = check_labels_scores(labels, scores)
        support = (labels == 1).sum(0)
        return average_over_classes(zero_shot.auroc_per_class(labels, scores), support,
                                    self.average)

    def on_counts(self, labels, scores, counts):
        """float[B, C] (or float[B] when averaged) for resample counts float[B, N]."""
        known = known_mask(labels)
        per_class = np.stack([weighted_auroc(labels[:, c], scores[:, c],
                                             counts * known[:, c])
                              for c in range(labels.shape[1])], axis=1)
        support = counts @ (labels == 1)
        return average_over_classes(per_class, support, self.average)


@dataclasses.dataclass(frozen=True, eq=False)
class ThresholdMetric:
    """One threshold metric of `metrics.THRESHOLD_METRICS` at fixed thresholds float[C]."""

    name: str
    thresholds: np.ndarray
    average: str | None = None

    def __post_init__(self):
        if self.name not in THRESHOLD_METRICS:
            raise ValueError(f"name must be one of {THRESHOLD_METRICS}, got {self.name!r}")

    def __call__(self, labels, scores):
        result = classification_metrics(labels, scores, self.thresholds)
        return average_over_classes(result.per_class[self.name], result.positives,
                                    self.average)

    def on_counts(self, labels, scores, counts):
        thresholds = check_thresholds(self.thresholds, labels.shape[1])
        called = scores >= thresholds
        present, absent = labels == 1, labels == 0
        # Weighted confusion counts for all resamples and classes: four matrix products.
        tp, fn = counts @ (present & called), counts @ (present & ~called)
        fp, tn = counts @ (absent & called), counts @ (absent & ~called)
        per_class = metrics_from_confusion(tp, fp, tn, fn)[self.name]
        per_class = np.where(np.isnan(thresholds), np.nan, per_class)
        return average_over_classes(per_class, tp + fn, self.average)


def auroc_metric(average: str | None = None) -> AurocMetric:
    return AurocMetric(average)


def threshold_metric(name: str, thresholds, average: str | None = None) -> ThresholdMetric:
    return ThresholdMetric(name, np.asarray(thresholds, np.float64), average)


@dataclasses.dataclass
class BootstrapResult:
    """Point estimate and percentile interval; arrays are 0-d (scalar metric) or [C]."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n_used: np.ndarray  # int, resamples in which the metric was defined
    n_resamples: int
    alpha: float
    seed: int
    samples: np.ndarray  # float[B, ...], NaN for skipped resamples

    def to_json(self, names: Sequence[str] | None = None) -> dict:
        def clean(x):
            return None if np.isnan(x) else float(x)

        common = {"n_resamples": self.n_resamples, "confidence": 1 - self.alpha,
                  "seed": self.seed, "method": "percentile bootstrap over volumes"}
        if self.estimate.ndim == 0:
            return {"estimate": clean(self.estimate), "low": clean(self.low),
                    "high": clean(self.high), "n_used": int(self.n_used), **common}
        names = names or [f"class_{c}" for c in range(self.estimate.size)]
        return {"per_class": {n: {"estimate": clean(self.estimate[c]),
                                  "low": clean(self.low[c]), "high": clean(self.high[c]),
                                  "n_used": int(self.n_used[c])}
                              for c, n in enumerate(names)}, **common}


def bootstrap_ci(labels, scores, metric_fn: Callable, n_resamples: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> BootstrapResult:
    """Percentile bootstrap CI of ``metric_fn(labels, scores)`` over volumes (rows).

    Args:
      labels, scores: float[N, C] (see `metrics`).
      metric_fn: (labels[N', C], scores[N', C]) -> float or float[C].  Objects with an
        ``on_counts(labels, scores, counts[B, N]) -> float[B, ...]`` method (e.g.
        `auroc_metric()`, `threshold_metric("f1", t)`) are evaluated vectorised.
      n_resamples: B, the number of resamples drawn (some may be skipped).
      seed: the resamples depend only on (N, B, seed).
      alpha: 0.05 for a 95 % interval.
    Returns:
      BootstrapResult; `n_used` says how many resamples each entry used.
    """
    labels, scores = check_labels_scores(labels, scores)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    num_rows, num_classes = labels.shape
    estimate = np.asarray(metric_fn(labels, scores), np.float64)
    per_class = estimate.shape == (num_classes,)
    present, absent = labels == 1, labels == 0
    defined_in_full = present.any(0) & absent.any(0)
    indices = resample_indices(num_rows, n_resamples, seed)
    samples = np.full((n_resamples,) + estimate.shape, np.nan)
    for start in range(0, n_resamples, _BLOCK):
        block = indices[start:start + _BLOCK]
        counts = _counts(block, num_rows)
        # A class is usable in a resample only with both label values present.
        usable = ((counts @ present) > 0) & ((counts @ absent) > 0)  # bool[b, C]
        if hasattr(metric_fn, "on_counts"):
            values = np.asarray(metric_fn.on_counts(labels, scores, counts), np.float64)
        else:
            values = np.stack([np.asarray(metric_fn(labels[i], scores[i]), np.float64)
                               for i in block])
        if per_class:
            values = np.where(usable, values, np.nan)
        else:
            keep = (usable | ~defined_in_full).all(1)
            values = np.where(keep.reshape((-1,) + (1,) * estimate.ndim), values, np.nan)
        samples[start:start + len(block)] = values
    n_used = (~np.isnan(samples)).sum(0)
    low, high = np.full(estimate.shape, np.nan), np.full(estimate.shape, np.nan)
    if n_used.max(initial=0) > 0:
        # Only entries with at least one used resample get an interval.
        has = n_used > 0
        q = np.nanquantile(samples[:, has] if estimate.ndim else samples,
                           [alpha / 2, 1 - alpha / 2], axis=0)
        if estimate.ndim:
            low[has], high[has] = q[0], q[1]
        else:
            low, high = q[0], q[1]
    return BootstrapResult(estimate, np.asarray(low), np.asarray(high), np.asarray(n_used),
                           n_resamples, alpha, seed, samples)
