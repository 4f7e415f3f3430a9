"""Evaluation of CT-CLIP-style models on numpy arrays (definitions in docs/evaluation.md).

`embedding` (the only module that runs a model, so the only one importing jax) is not
imported here: `from ct_rate_jax.evaluation import embedding`.
"""

from ct_rate_jax.evaluation.bootstrap import (BootstrapResult, auroc_metric, bootstrap_ci,
                                              resample_indices, threshold_metric)
from ct_rate_jax.evaluation.label_mapping import (RAD_CHESTCT_MAPPING, LabelMapping,
                                                  load_label_mapping)
from ct_rate_jax.evaluation.metrics import (METRIC_NAMES, ClassificationMetrics,
                                            classification_metrics)
from ct_rate_jax.evaluation.report import markdown_report, write_report
from ct_rate_jax.evaluation.retrieval import (ORIGINAL_MAP_SETTINGS, binary_map_at_k,
                                              chance_recall_at_k, correct_match_ranks,
                                              cosine_similarity, map_at_k,
                                              map_at_k_per_query,
                                              random_embedding_recall_at_k, recall_at_k)
from ct_rate_jax.evaluation.runner import (EmbeddedSet, EvaluationResult,
                                           EvaluationSettings, evaluate_embeddings,
                                           evaluate_scores)
from ct_rate_jax.evaluation.thresholds import (PROTOCOL_OPTIMISTIC, PROTOCOL_VALIDATION,
                                               group_split, optimistic_metrics,
                                               select_thresholds, validation_test_metrics,
                                               validation_thresholds,
                                               youden_closest_thresholds)
from ct_rate_jax.evaluation.zero_shot import (ZeroShotResult, auroc_per_class,
                                              evaluate_zero_shot, prompt_pairs,
                                              zero_shot_scores)

__all__ = [
    "BootstrapResult", "ClassificationMetrics", "EmbeddedSet", "EvaluationResult",
    "EvaluationSettings", "LabelMapping", "METRIC_NAMES",
    "ORIGINAL_MAP_SETTINGS", "PROTOCOL_OPTIMISTIC", "PROTOCOL_VALIDATION",
    "RAD_CHESTCT_MAPPING", "ZeroShotResult", "auroc_metric", "auroc_per_class",
    "binary_map_at_k", "bootstrap_ci", "chance_recall_at_k", "classification_metrics",
    "correct_match_ranks", "cosine_similarity", "evaluate_embeddings",
    "evaluate_scores", "evaluate_zero_shot", "group_split", "load_label_mapping",
    "markdown_report",
    "map_at_k", "map_at_k_per_query", "optimistic_metrics", "prompt_pairs",
    "random_embedding_recall_at_k", "recall_at_k", "resample_indices",
    "select_thresholds", "threshold_metric", "validation_test_metrics",
    "validation_thresholds", "write_report", "youden_closest_thresholds",
    "zero_shot_scores",
]
