"""The metric library against scikit-learn, brute force and hand-computed tiny cases."""

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score,
                             precision_score, recall_score, roc_auc_score)

from ct_rate_jax.evaluation import (ORIGINAL_MAP_SETTINGS, PROTOCOL_OPTIMISTIC,
                                    RAD_CHESTCT_MAPPING, LabelMapping, auroc_metric,
                                    auroc_per_class, binary_map_at_k, bootstrap_ci,
                                    chance_recall_at_k, classification_metrics,
                                    correct_match_ranks, group_split, map_at_k,
                                    optimistic_metrics, random_embedding_recall_at_k,
                                    recall_at_k, resample_indices, select_thresholds,
                                    threshold_metric, validation_test_metrics,
                                    validation_thresholds, youden_closest_thresholds)
from ct_rate_jax.evaluation.bootstrap import _counts, weighted_auroc
from ct_rate_jax.evaluation.thresholds import ORIGINAL_GRID
from data_pipeline.schema import ABNORMALITIES


def _toy(n=300, c=4, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=(n, c)) < np.linspace(0.1, 0.5, c)).astype(float)
    scores = 1 / (1 + np.exp(-(rng.normal(size=(n, c)) + signal * (2 * labels - 1))))
    return labels, np.round(scores, 2)  # rounding makes ties, which must be handled


# ---------------------------------------------------------------- classification metrics

def test_classification_metrics_match_sklearn_and_skip_unknown_labels():
    labels, scores = _toy()
    labels[:7, 1] = -1  # unknown: left out of class 1 only
    thresholds = np.array([0.3, 0.5, 0.6, 0.45])
    result = classification_metrics(labels, scores, thresholds)
    for c in range(4):
        known = labels[:, c] >= 0
        y, s = labels[known, c], scores[known, c]
        pred = (s >= thresholds[c]).astype(int)
        expected = {"auroc": roc_auc_score(y, s), "average_precision":
                    average_precision_score(y, s), "f1": f1_score(y, pred),
                    "f1_two_class_weighted": f1_score(y, pred, average="weighted"),
                    "accuracy": accuracy_score(y, pred), "precision": precision_score(y, pred),
                    "recall": recall_score(y, pred),
                    "specificity": recall_score(y, pred, pos_label=0)}
        for name, value in expected.items():
            assert result.per_class[name][c] == pytest.approx(value, abs=1e-12), name
        assert result.positives[c] == y.sum() and result.negatives[c] == (1 - y).sum()


def test_macro_and_weighted_averages_on_an_imbalanced_toy():
    # Class 0: 1 positive, missed (recall 0); class 1: 3 positives, all found (recall 1).
    labels = np.array([[1, 1], [0, 1], [0, 1], [0, 0]], float)
    scores = np.array([[0.2, 0.9], [0.1, 0.9], [0.1, 0.9], [0.1, 0.1]])
    result = classification_metrics(labels, scores, [0.5, 0.5])
    assert result.macro["recall"] == pytest.approx(0.5)
    assert result.weighted["recall"] == pytest.approx((1 * 0 + 3 * 1) / 4)
    predicted = (scores >= 0.5).astype(int)
    for average in ("macro", "weighted"):
        assert getattr(result, average)["recall"] == pytest.approx(
            recall_score(labels, predicted, average=average))
    # Nothing called positive in class 0: precision undefined (NaN), not 0, and left
    # out of the averages.
    assert np.isnan(result.per_class["precision"][0])
    assert result.macro["precision"] == pytest.approx(1.0)
    assert result.to_json()["per_class"]["class_0"]["precision"] is None


def test_vectorised_threshold_metrics_equal_the_sklearn_path():
    labels, scores = _toy(seed=3)
    labels[:5, 2] = -1
    thresholds = youden_closest_thresholds(labels, scores)
    reference = classification_metrics(labels, scores, thresholds)
    ones = np.ones((1, len(labels)))
    for name in ("f1", "f1_two_class_weighted", "accuracy", "precision", "recall",
                 "specificity"):
        for average in (None, "macro", "weighted"):
            metric = threshold_metric(name, thresholds, average)
            np.testing.assert_allclose(metric.on_counts(labels, scores, ones)[0],
                                       metric(labels, scores), atol=1e-12)
        np.testing.assert_allclose(threshold_metric(name, thresholds)(labels, scores),
                                   reference.per_class[name])


# ------------------------------------------------------------------------- thresholds

def test_thresholds_on_a_perfectly_separable_case():
    labels = np.array([[0], [0], [0], [1], [1]], float)
    scores = np.array([[0.1], [0.2], [0.3], [0.7], [0.9]])
    thresholds = youden_closest_thresholds(labels, scores)
    assert thresholds[0] == 0.7  # the lowest positive score reaches (FPR, TPR) = (0, 1)
    result = optimistic_metrics(labels, scores)
    for name in ("f1", "accuracy", "precision", "recall", "specificity", "auroc"):
        assert result.per_class[name][0] == 1.0
    assert result.protocol == PROTOCOL_OPTIMISTIC and "optimistic" in result.protocol
    assert "optimistic" in result.to_json()["protocol"]


@pytest.mark.parametrize("criterion", ["closest", "youden", "f1"])
def test_threshold_criteria_match_brute_force(criterion):
    labels, scores = _toy(n=120, c=3, seed=5)
    chosen = select_thresholds(labels, scores, criterion)
    for c in range(3):
        y, s = labels[:, c], scores[:, c]

        def value(t):
            pred = s >= t
            tpr, fpr = pred[y == 1].mean(), pred[y == 0].mean()
            return {"closest": -np.hypot(1 - tpr, fpr), "youden": tpr - fpr,
                    "f1": f1_score(y, pred, zero_division=0)}[criterion]

        best = max(value(t) for t in np.unique(s))
        assert value(chosen[c]) == pytest.approx(best)


def test_grid_candidates_reproduce_the_original_thresholds():
    labels, scores = _toy(n=200, c=3, seed=2)
    ours = youden_closest_thresholds(labels, scores, candidates="grid")
    for c in range(3):
        y, s = labels[:, c], scores[:, c]
        # The original's search: t on a 100-point grid, predict s > t, keep the last
        # t whose ROC point is at least as close to (0, 1).
        best_t, best_d = 0.0, np.inf
        for t in ORIGINAL_GRID:
            pred = s > t
            d = np.sqrt((1 - pred[y == 1].mean()) ** 2 + pred[y == 0].mean() ** 2)
            if d <= best_d:
                best_t, best_d = t, d
        np.testing.assert_array_equal(s >= ours[c], s > best_t)


def test_single_valued_class_gets_nan_threshold_and_metrics():
    labels, scores = _toy(n=50, c=2)
    labels[:, 1] = 0
    thresholds = youden_closest_thresholds(labels, scores)
    assert np.isnan(thresholds[1]) and not np.isnan(thresholds[0])
    result = classification_metrics(labels, scores, thresholds)
    assert np.isnan(result.per_class["f1"][1]) and np.isnan(result.per_class["auroc"][1])


def test_validation_protocol_applies_validation_thresholds_to_test():
    labels, scores = _toy(n=400, seed=7)
    val, test = group_split(np.arange(400) // 2, test_fraction=0.5, seed=0)
    result = validation_test_metrics(labels[val], scores[val], labels[test], scores[test],
                                     criterion="youden")
    thresholds = validation_thresholds(labels[val], scores[val], "youden")
    np.testing.assert_array_equal(result.thresholds, thresholds)
    expected = classification_metrics(labels[test], scores[test], thresholds)
    np.testing.assert_array_equal(result.per_class["f1"], expected.per_class["f1"])
    assert "validation" in result.protocol and "optimistic" not in result.protocol


def test_group_split_keeps_groups_together_and_is_seeded():
    groups = np.repeat([f"valid_{p}" for p in range(40)], np.arange(40) % 3 + 1)
    val, test = group_split(groups, test_fraction=0.3, seed=1)
    assert not set(groups[val]) & set(groups[test])
    assert sorted(np.r_[val, test]) == list(range(len(groups)))
    assert 0.3 <= len(test) / len(groups) < 0.4
    np.testing.assert_array_equal(group_split(groups, 0.3, seed=1)[1], test)
    assert not np.array_equal(group_split(groups, 0.3, seed=2)[1], test)
    with pytest.raises(ValueError, match="test_fraction"):
        group_split(groups, 1.5)


# -------------------------------------------------------------------------- bootstrap

def test_weighted_auroc_equals_sklearn_on_resampled_rows():
    labels, scores = _toy(n=150, c=2, seed=4)
    labels[:10, 0] = -1
    indices = resample_indices(150, 5, seed=9)
    counts = _counts(indices, 150)
    for c in range(2):
        known = (labels[:, c] >= 0).astype(float)
        auroc = weighted_auroc(labels[:, c], scores[:, c], counts * known)
        for b, rows in enumerate(indices):
            rows = rows[labels[rows, c] >= 0]
            assert auroc[b] == pytest.approx(roc_auc_score(labels[rows, c], scores[rows, c]),
                                             abs=1e-12)


def test_bootstrap_ci_really_resamples_and_is_seeded():
    labels, scores = _toy(n=200, c=3)
    result = bootstrap_ci(labels, scores, auroc_metric(), n_resamples=200, seed=0)
    np.testing.assert_array_equal(result.estimate, auroc_per_class(labels, scores))
    assert np.all(result.low <= result.estimate) and np.all(result.estimate <= result.high)
    assert np.all(result.high - result.low > 0.02)  # the original's width is exactly 0
    assert np.all(np.std(result.samples, axis=0) > 0)
    again = bootstrap_ci(labels, scores, auroc_metric(), n_resamples=200, seed=0)
    np.testing.assert_array_equal(again.samples, result.samples)
    other = bootstrap_ci(labels, scores, auroc_metric(), n_resamples=200, seed=1)
    assert not np.array_equal(other.samples, result.samples)


def test_bootstrap_interval_shrinks_with_more_data():
    small = bootstrap_ci(*_toy(n=100, c=2), auroc_metric("macro"), n_resamples=300)
    large = bootstrap_ci(*_toy(n=3000, c=2), auroc_metric("macro"), n_resamples=300)
    assert (large.high - large.low) < 0.5 * (small.high - small.low)


def test_bootstrap_skips_resamples_without_both_label_values():
    labels, scores = _toy(n=20, c=2)
    labels[:, 1] = 0
    labels[3, 1] = 1  # a single positive: resamples that miss row 3 are undefined
    result = bootstrap_ci(labels, scores, auroc_metric(), n_resamples=300, seed=5)
    with_row_3 = (resample_indices(20, 300, seed=5) == 3).any(1).sum()
    assert result.n_used[1] == with_row_3 < 300
    macro = bootstrap_ci(labels, scores, auroc_metric("macro"), n_resamples=300, seed=5)
    assert macro.n_used <= with_row_3
    assert macro.to_json()["n_used"] == int(macro.n_used)


def test_generic_callables_give_the_same_resamples_as_the_vectorised_path():
    labels, scores = _toy(n=80, c=3, seed=8)
    thresholds = youden_closest_thresholds(labels, scores)
    for fast in (auroc_metric(), auroc_metric("weighted"),
                 threshold_metric("specificity", thresholds, "macro")):
        vectorised = bootstrap_ci(labels, scores, fast, n_resamples=30, seed=3)
        looped = bootstrap_ci(labels, scores, lambda l, s: fast(l, s), n_resamples=30,
                              seed=3)
        np.testing.assert_allclose(looped.samples, vectorised.samples, atol=1e-12)


# -------------------------------------------------------------------------- retrieval

def test_recall_at_k_on_a_permutation():
    similarity = np.eye(4)[[1, 0, 2, 3]]  # rows 0 and 1 swapped, rows 2 and 3 right
    np.testing.assert_array_equal(correct_match_ranks(similarity), [1, 1, 0, 0])
    assert recall_at_k(similarity, 1) == 0.5
    assert recall_at_k(similarity, 2) == 1.0
    assert recall_at_k(similarity.T, 1) == 0.5  # volume -> report


def test_recall_at_k_matches_a_stable_sort_with_ties():
    rng = np.random.default_rng(0)
    similarity = np.round(rng.normal(size=(30, 40)), 1)  # many ties
    for k in (1, 5, 10):
        hits = [i in sorted(range(40), key=lambda j: similarity[i, j], reverse=True)[:k]
                for i in range(30)]
        assert recall_at_k(similarity, k) == np.mean(hits)
    with pytest.raises(ValueError, match="k = 41"):
        recall_at_k(similarity, 41)


def test_random_embedding_baseline_is_seeded_and_near_chance():
    assert chance_recall_at_k(500, 50) == 0.1
    value = random_embedding_recall_at_k(500, 50, seed=0)
    assert value == random_embedding_recall_at_k(500, 50, seed=0)
    assert abs(value - 0.1) < 0.05


# Four volumes: A = {0}, B = {0, 1}, C = {1}, D = {} (all negative).  Jaccard relevance:
# A-B 1/2, A-C 0, B-C 1/2, anything-D 0.
_LABELS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
_SIMILARITY = np.array([[1.0, 0.9, 0.5, 0.1],
                        [0.9, 1.0, 0.8, 0.2],
                        [0.5, 0.8, 1.0, 0.3],
                        [0.1, 0.2, 0.3, 1.0]])


def test_map_at_k_by_hand():
    # Self excluded, D skipped.  k=1: A->B 1/2, B->A 1/2, C->B 1/2.
    assert map_at_k(_LABELS, _LABELS, _SIMILARITY, 1) == pytest.approx(0.5)
    # k=2: A->(B, C) 1/4, B->(A, C) 1/2, C->(B, A) 1/4.
    assert map_at_k(_LABELS, _LABELS, _SIMILARITY, 2) == pytest.approx(1 / 3)
    # The original's settings: each query finds itself first (relevance 1), D counts 0,
    # D is not in the database.  k=1: (1 + 1 + 1 + 0) / 4; k=2: A->(A, B) 3/4, etc.
    assert map_at_k(_LABELS, _LABELS, _SIMILARITY, 1,
                    **ORIGINAL_MAP_SETTINGS) == pytest.approx(0.75)
    assert map_at_k(_LABELS, _LABELS, _SIMILARITY, 2,
                    **ORIGINAL_MAP_SETTINGS) == pytest.approx(3 * 0.75 / 4)
    # (The original prints 4.25 / 8 for k=2: its k=1 values are still in the list.)


def test_binary_map_at_k_by_hand():
    similarity = _SIMILARITY.copy()
    similarity[0] = [1.0, 0.5, 0.9, 0.1]  # A now ranks C (irrelevant) above B
    # Relevant = shares a positive label: A:{B}, B:{A, C}, C:{B}; D has none (left out).
    # k=1: A 0, B 1, C 1.  k=2: A (0 + 1/2) / 1, B (1 + 1) / 2, C 1 / 1.
    assert binary_map_at_k(_LABELS, _LABELS, similarity, 1) == pytest.approx(2 / 3)
    assert binary_map_at_k(_LABELS, _LABELS, similarity, 2) == pytest.approx(2.5 / 3)
    assert map_at_k(_LABELS, _LABELS, similarity, 1) == pytest.approx(1 / 3)


def test_map_at_k_with_original_settings_matches_a_loop_over_the_original_definition():
    rng = np.random.default_rng(1)
    labels = (rng.uniform(size=(40, 5)) < 0.3).astype(int)
    similarity = np.round(rng.normal(size=(40, 40)), 1)
    database = [j for j in range(40) if labels[j].any()]
    for k in (1, 5, 10):
        per_query = []
        for i in range(40):
            top = sorted(database, key=lambda j: similarity[i, j], reverse=True)[:k]
            shared = [np.sum(labels[i] & labels[j]) for j in top]
            either = [np.sum(labels[i] | labels[j]) for j in top]
            per_query.append(np.mean(np.divide(shared, either)))
        assert map_at_k(labels, labels, similarity, k, **ORIGINAL_MAP_SETTINGS) == \
            pytest.approx(np.mean(per_query))


def test_retrieval_arguments_are_checked():
    with pytest.raises(ValueError, match="exclude_self"):
        map_at_k(_LABELS[:3], _LABELS, _SIMILARITY[:3], 1)
    with pytest.raises(ValueError, match="query_labels"):
        map_at_k(-_LABELS, _LABELS, _SIMILARITY, 1)
    with pytest.raises(ValueError, match="k = 4"):
        map_at_k(_LABELS, _LABELS, _SIMILARITY, 4)  # 3 items left once self is excluded
    with pytest.raises(ValueError, match="all_negative_queries"):
        map_at_k(_LABELS, _LABELS, _SIMILARITY, 1, all_negative_queries="drop")


# ---------------------------------------------------------------------- label mapping

def test_rad_chestct_mapping_follows_the_original():
    assert len(RAD_CHESTCT_MAPPING.target_names) == 16
    assert "Mosaic attenuation pattern" not in RAD_CHESTCT_MAPPING.target_names
    assert "Coronary artery wall calcification" not in RAD_CHESTCT_MAPPING.target_names
    scores = np.random.default_rng(0).uniform(size=(6, 18))
    mapped = RAD_CHESTCT_MAPPING.map_scores(scores)
    np.testing.assert_array_equal(mapped[:, 1], np.maximum(scores[:, 1], scores[:, 4]))
    keep = [c for c in range(18) if c not in (4, 13)]
    np.testing.assert_array_equal(mapped[:, [0] + list(range(2, 16))],
                                  scores[:, [keep[0]] + keep[2:]])


def test_label_mapping_merge_rules_and_errors():
    names = ("a", "b", "c")
    scores = np.array([[0.5, 0.2, 0.9]])
    for merge, expected in (("max", 0.5), ("mean", 0.35), ("noisy_or", 1 - 0.5 * 0.8)):
        mapping = LabelMapping.from_dict({"ab": ["a", "b"], "c": ["c"]}, merge, names)
        np.testing.assert_allclose(mapping.map_scores(scores), [[expected, 0.9]])
    labels = np.array([[1, -1, 0], [0, 0, 0], [0, -1, 0]])
    np.testing.assert_array_equal(mapping.map_labels(labels)[:, 0], [1, 0, -1])
    with pytest.raises(ValueError, match="'x'"):
        LabelMapping.from_dict({"x": ["not a class"]}, source_names=names)
    with pytest.raises(ValueError, match="scores must be"):
        RAD_CHESTCT_MAPPING.map_scores(scores)
    assert RAD_CHESTCT_MAPPING.source_names == ABNORMALITIES
