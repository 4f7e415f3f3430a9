"""Every evaluation of the paper from latents: zero-shot, thresholds, retrieval.

    result = evaluate_embeddings(test_set, positive_latents, negative_latents, scale,
                                 EvaluationSettings(), val=val_set)
    result.metrics      # JSON-able dict, the body of metrics.json
    result.scores       # float[N, C] zero-shot P(present) of the test volumes

    # Scores from elsewhere (a ClassFine head), or in another label set:
    result = evaluate_scores(test_set, scores, settings, val_set, val_scores,
                             scoring=CLASSFINE_SCORING, mapping=RAD_CHESTCT_MAPPING)

No model code (numpy only): `embedding.embed_batches` makes the `EmbeddedSet`s.  Definitions of
every number are in docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ct_rate_jax.evaluation import bootstrap, retrieval, thresholds, zero_shot
from ct_rate_jax.evaluation.label_mapping import LabelMapping
from ct_rate_jax.evaluation.metrics import ClassificationMetrics, classification_metrics
from data_pipeline.schema import ABNORMALITIES

# Threshold metrics that get bootstrap intervals (AUROC has its own, in zero_shot).
CI_METRICS = ("f1", "f1_two_class_weighted", "accuracy", "precision", "recall",
              "specificity")
AVERAGES = ("macro", "weighted")


@dataclasses.dataclass
class EmbeddedSet:
    """The model's view of one evaluation set, rows in data order.

    Attributes:
      volume_names: N names (CT-RATE VolumeName).
      labels: float[N, C] (1 present, 0 absent, else unknown).
      image_latents: float32[N, L], unit norm.
      text_latents: float32[N, L] latents of each volume's report, or None.
      tokens: float32[N, T, h, w, d] CT-ViT token grids before pooling, or None.
    """

    volume_names: list[str]
    labels: np.ndarray
    image_latents: np.ndarray
    text_latents: np.ndarray | None = None
    tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.volume_names)


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """What to compute.  Ks beyond what the data allows are dropped and noted."""

    names: tuple[str, ...] = ABNORMALITIES
    positive_template: str = zero_shot.DEFAULT_POSITIVE_TEMPLATE
    negative_template: str = zero_shot.DEFAULT_NEGATIVE_TEMPLATE
    n_bootstrap: int = 1000
    seed: int = 0
    alpha: float = 0.05
    threshold_criterion: str = "closest"  # protocol (b)
    map_ks: tuple[int, ...] = (1, 5, 10, 50)
    recall_ks: tuple[int, ...] = (5, 10, 50, 100)
    standard_ks: tuple[int, ...] = (1, 5, 10)
    random_baseline_dim: int = 512


@dataclasses.dataclass(frozen=True)
class Scoring:
    """Where the scores come from: `section` is their metrics.json key."""

    section: str
    description: str


ZERO_SHOT_SCORING = Scoring("zero_shot", "softmax over the prompt pair, P(present)")
CLASSFINE_SCORING = Scoring("classfine", "sigmoid of the ClassFine head's logit, "
                            "sigmoid(relu(image latent) @ W.T + b)")


@dataclasses.dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    scores: np.ndarray  # float[N, C] test scores (in the mapped label set, if any)
    val_scores: np.ndarray | None
    optimistic: ClassificationMetrics
    held_out: ClassificationMetrics | None
    labels: np.ndarray | None = None  # float[N, C] test labels the scores are judged by
    names: tuple[str, ...] = ABNORMALITIES


def _clean(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _interval(result: bootstrap.BootstrapResult, names: Sequence[str] | None = None):
    """Compact CI record: {estimate, low, high, n_used} (per class when `names`)."""
    if names is None:
        return {"estimate": _clean(result.estimate), "low": _clean(result.low),
                "high": _clean(result.high), "n_used": int(result.n_used)}
    return {n: {"estimate": _clean(result.estimate[c]), "low": _clean(result.low[c]),
                "high": _clean(result.high[c]), "n_used": int(result.n_used[c])}
            for c, n in enumerate(names)}


def _bootstrap_note(settings: EvaluationSettings) -> dict:
    return {"n_resamples": settings.n_bootstrap, "confidence": 1 - settings.alpha,
            "seed": settings.seed, "method": "percentile bootstrap over volumes"}


# ----------------------------------------------------------------------------------
# Zero-shot AUROC and threshold metrics
# ----------------------------------------------------------------------------------

def zero_shot_section(labels, scores, settings: EvaluationSettings,
                      scoring: Scoring = ZERO_SHOT_SCORING) -> dict:
    """Per-class AUROC, macro ("mean", the paper's) and weighted mean, with CIs."""
    names = list(settings.names)
    auroc = zero_shot.auroc_per_class(labels, scores)
    templates = ([settings.positive_template, settings.negative_template]
                 if scoring == ZERO_SHOT_SCORING else None)
    section = {"templates": templates, "score": scoring.description,
               "num_volumes": int(len(labels)),
               "positives": {n: int((labels[:, c] == 1).sum()) for c, n in enumerate(names)},
               "auroc": {n: _clean(a) for n, a in zip(names, auroc)},
               "mean_auroc": _clean(np.nanmean(auroc)) if not np.isnan(auroc).all() else None}
    if settings.n_bootstrap:
        kw = dict(n_resamples=settings.n_bootstrap, seed=settings.seed, alpha=settings.alpha)
        section["auroc_ci"] = _interval(
            bootstrap.bootstrap_ci(labels, scores, bootstrap.auroc_metric(), **kw), names)
        for average in AVERAGES:
            section[f"{average}_auroc_ci"] = _interval(bootstrap.bootstrap_ci(
                labels, scores, bootstrap.auroc_metric(average), **kw))
        section["bootstrap"] = _bootstrap_note(settings)
    return section


def classification_section(labels, scores, result: ClassificationMetrics,
                           settings: EvaluationSettings) -> dict:
    """`ClassificationMetrics.to_json()` plus bootstrap CIs of the threshold metrics
    (thresholds held fixed: chosen on the full data for (a), on validation for (b))."""
    section = result.to_json()
    if settings.n_bootstrap:
        kw = dict(n_resamples=settings.n_bootstrap, seed=settings.seed, alpha=settings.alpha)
        intervals = {}
        for name in CI_METRICS:
            intervals[name] = {"per_class": _interval(bootstrap.bootstrap_ci(
                labels, scores, bootstrap.threshold_metric(name, result.thresholds), **kw),
                list(settings.names))}
            for average in AVERAGES:
                intervals[name][average] = _interval(bootstrap.bootstrap_ci(
                    labels, scores,
                    bootstrap.threshold_metric(name, result.thresholds, average), **kw))
        section["confidence_intervals"] = intervals
        section["bootstrap"] = _bootstrap_note(settings)
    return section


# ----------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------

def _usable_ks(ks: Sequence[int], available: int, what: str, notes: list[str]) -> list[int]:
    usable = [k for k in ks if k <= available]
    if len(usable) < len(ks):
        notes.append(f"{what}: k = {sorted(set(ks) - set(usable))} left out, a query can "
                     f"retrieve only {available} items here")
    return usable


def volume_to_volume_section(image_latents, labels, settings: EvaluationSettings,
                             notes: list[str]) -> dict:
    """MAP@k (CT-CLIP's Jaccard-relevance definition) under our protocol and the
    original's settings, the textbook binary MAP@k, and a random-embedding row."""
    binary = (np.asarray(labels) == 1).astype(np.int64)  # unknown counts as absent
    similarity = retrieval.cosine_similarity(image_latents, image_latents)
    ks = _usable_ks(settings.map_ks, len(binary) - 1, "volume->volume MAP@k", notes)
    rng = np.random.default_rng(settings.seed)
    random_latents = rng.standard_normal((len(binary), settings.random_baseline_dim))
    random_similarity = retrieval.cosine_similarity(random_latents, random_latents)
    original_available = int(binary.any(1).sum())  # it drops all-negative volumes

    def original(sim, k):
        if k > original_available:
            return None
        return _clean(retrieval.map_at_k(binary, binary, sim, k,
                                         **retrieval.ORIGINAL_MAP_SETTINGS))

    section = {"ks": ks, "protocol": "exclude self, all-negative queries skipped, "
               "all-negative database volumes kept; one k per call",
               "map_at_k": {}, "map_at_k_original_settings": {}, "binary_map_at_k": {},
               "random_embedding_map_at_k": {}}
    for k in ks:
        section["map_at_k"][str(k)] = _clean(retrieval.map_at_k(binary, binary, similarity, k))
        section["map_at_k_original_settings"][str(k)] = original(similarity, k)
        section["binary_map_at_k"][str(k)] = _clean(
            retrieval.binary_map_at_k(binary, binary, similarity, k))
        section["random_embedding_map_at_k"][str(k)] = _clean(
            retrieval.map_at_k(binary, binary, random_similarity, k))
    return section


def report_volume_section(text_latents, image_latents, settings: EvaluationSettings,
                          notes: list[str]) -> dict:
    """Report->volume Recall@k (the paper's ks) with random baselines, and the standard
    R@1/5/10 in both directions.  Report i's match is volume i."""
    similarity = retrieval.cosine_similarity(text_latents, image_latents)  # [reports, vols]
    count = len(similarity)
    ks = _usable_ks(settings.recall_ks, count, "report->volume Recall@k", notes)
    standard = _usable_ks(settings.standard_ks, count, "standard R@k", notes)
    return {
        "report_to_volume": {
            "ks": ks,
            "recall_at_k": {str(k): retrieval.recall_at_k(similarity, k) for k in ks},
            "chance_recall_at_k": {str(k): retrieval.chance_recall_at_k(count, k)
                                   for k in ks},
            "random_embedding_recall_at_k": {
                str(k): retrieval.random_embedding_recall_at_k(
                    count, k, seed=settings.seed, dim=settings.random_baseline_dim)
                for k in ks}},
        "standard": {
            "ks": standard,
            "report_to_volume": {f"R@{k}": retrieval.recall_at_k(similarity, k)
                                 for k in standard},
            "volume_to_report": {f"R@{k}": retrieval.recall_at_k(similarity.T, k)
                                 for k in standard}},
    }


# ----------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------

def evaluate_embeddings(test: EmbeddedSet, positive_latents: np.ndarray,
                        negative_latents: np.ndarray, logit_scale: float,
                        settings: EvaluationSettings = EvaluationSettings(),
                        val: EmbeddedSet | None = None,
                        mapping: LabelMapping | None = None) -> EvaluationResult:
    """All metrics of one zero-shot evaluation.

    Args:
      test: the evaluation set (labels float[N, C] in `settings.names` order).
      positive_latents, negative_latents: float[C, L] prompt latents.
      logit_scale: the model's exp(temperature).
      val: a separate validation set for protocol (b); None skips it.
      mapping: evaluate in another label set (`evaluate_scores`).
    """
    def scores_of(embedded):
        return zero_shot.zero_shot_scores(embedded.image_latents, positive_latents,
                                          negative_latents, logit_scale)

    result = evaluate_scores(test, scores_of(test), settings, val,
                             scores_of(val) if val is not None else None, mapping=mapping)
    result.metrics["logit_scale"] = float(logit_scale)
    return result


def evaluate_scores(test: EmbeddedSet, scores: np.ndarray,
                    settings: EvaluationSettings = EvaluationSettings(),
                    val: EmbeddedSet | None = None, val_scores: np.ndarray | None = None,
                    *, scoring: Scoring = ZERO_SHOT_SCORING,
                    mapping: LabelMapping | None = None) -> EvaluationResult:
    """All metrics of one evaluation from per-volume scores float[N, C] (C =
    len(settings.names), the data's label columns).

    With `mapping`, scores and labels (test and validation) are first mapped into its
    label set (`LabelMapping.map_scores` / `map_labels`) and every number, retrieval
    relevance included, is computed there; `metrics["label_mapping"]` records it.
    """
    names = list(settings.names)
    if test.labels.shape[1] != len(names) or scores.shape != test.labels.shape:
        raise ValueError(f"the data has {test.labels.shape[1]} label columns, the scores "
                         f"{scores.shape}, and there are {len(names)} class names")
    if (val is None) != (val_scores is None):
        raise ValueError("val and val_scores come together")
    labels, val_labels = test.labels, (val.labels if val is not None else None)
    if mapping is not None:
        if tuple(mapping.source_names) != tuple(names):
            raise ValueError("the label mapping's source classes are not the data's columns")
        scores, labels = mapping.map_scores(scores), mapping.map_labels(labels)
        if val is not None:
            val_scores, val_labels = mapping.map_scores(val_scores), mapping.map_labels(val_labels)
        settings = dataclasses.replace(settings, names=tuple(mapping.target_names))
        names = list(settings.names)
    notes: list[str] = []
    optimistic = thresholds.optimistic_metrics(labels, scores, names)
    classification = {"optimistic": classification_section(labels, scores, optimistic,
                                                           settings)}
    held_out = None
    if val is not None:
        cut = thresholds.validation_thresholds(val_labels, val_scores,
                                               settings.threshold_criterion)
        held_out = classification_metrics(
            labels, scores, cut, names,
            thresholds.PROTOCOL_VALIDATION.format(criterion=settings.threshold_criterion))
        classification["held_out"] = classification_section(labels, scores, held_out,
                                                            settings)
        classification["held_out"]["num_validation_volumes"] = len(val)
        overlap = set(val.volume_names) & set(test.volume_names)
        if overlap:
            notes.append(f"{len(overlap)} volume(s) are in both the validation and the "
                         "test data: protocol (b) is not held out for them")
    else:
        classification["held_out"] = None
        notes.append("protocol (b) not run: pass --val-data (a split disjoint from "
                     "--data, by patient)")
    metrics: dict[str, Any] = {
        scoring.section: zero_shot_section(labels, scores, settings, scoring),
        "classification": classification,
        "retrieval": {"volume_to_volume": volume_to_volume_section(
            test.image_latents, labels, settings, notes)},
    }
    if mapping is not None:
        metrics["label_mapping"] = {"merge": mapping.merge, "classes": {
            target: list(members) for target, members in mapping.groups}}
    if test.text_latents is not None:
        metrics["retrieval"].update(report_volume_section(
            test.text_latents, test.image_latents, settings, notes))
    metrics["notes"] = notes
    return EvaluationResult(metrics, scores, val_scores, optimistic, held_out, labels,
                            tuple(names))
