"""Evaluation: prediction files, cross-validation, external validation, thresholds, confidence
intervals, reports."""

from lympho_mil.evaluation.bootstrap import (
    OOFArrays,
    binary_metrics,
    metric_summary,
    paired_difference,
    stratified_bootstrap_weights,
    weighted_binary_metrics,
)
from lympho_mil.evaluation.cv import (
    Comparison,
    CVResult,
    FoldSplit,
    compare_configs,
    cross_validate,
    cv_splits,
)
from lympho_mil.evaluation.ensemble import ensemble_records
from lympho_mil.evaluation.explain import write_explanations
from lympho_mil.evaluation.external import ModelPredictions, evaluate_predictions
from lympho_mil.evaluation.predictions import PredictionWriter, write_predictions
from lympho_mil.evaluation.thresholds import best_balanced_accuracy_threshold, choose_threshold

__all__ = [
    "CVResult",
    "Comparison",
    "FoldSplit",
    "ModelPredictions",
    "OOFArrays",
    "PredictionWriter",
    "best_balanced_accuracy_threshold",
    "binary_metrics",
    "choose_threshold",
    "compare_configs",
    "cross_validate",
    "cv_splits",
    "ensemble_records",
    "evaluate_predictions",
    "metric_summary",
    "paired_difference",
    "stratified_bootstrap_weights",
    "weighted_binary_metrics",
    "write_explanations",
    "write_predictions",
]
