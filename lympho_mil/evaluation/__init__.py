"""Evaluation: prediction files, montages, cross-validation, external validation, thresholds,
bootstrap intervals, fold ensembles and reports.

Usable from Python without the command layer, which it never imports: cross-validation
trains its folds through a `FoldRunner` its caller gives (`ModuleRunner` for Python
callables; the command line's builds them from ``fit`` configs), and an external validation
has its models predict through a `CohortPredictor` (the command line's runs ``predict`` on a
checkpoint).
"""

from lympho_mil.evaluation.bag import BagResult, fit_bag
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
    FoldObjects,
    FoldRunner,
    FoldSetup,
    FoldSplit,
    ModuleRunner,
    cv_splits,
    run_comparison,
    run_cross_validation,
)
from lympho_mil.evaluation.ensemble import bag_fold, ensemble_records
from lympho_mil.evaluation.explain import write_explanations
from lympho_mil.evaluation.external import ModelPredictions, evaluate_predictions
from lympho_mil.evaluation.external_cohort import CohortPredictor, cohort_patients, evaluate_cohort
from lympho_mil.evaluation.predictions import PredictionWriter, write_predictions
from lympho_mil.evaluation.thresholds import best_balanced_accuracy_threshold, choose_threshold

__all__ = [
    "BagResult",
    "CVResult",
    "CohortPredictor",
    "Comparison",
    "FoldObjects",
    "FoldRunner",
    "FoldSetup",
    "FoldSplit",
    "ModelPredictions",
    "ModuleRunner",
    "OOFArrays",
    "PredictionWriter",
    "bag_fold",
    "best_balanced_accuracy_threshold",
    "binary_metrics",
    "choose_threshold",
    "cohort_patients",
    "cv_splits",
    "ensemble_records",
    "evaluate_cohort",
    "evaluate_predictions",
    "fit_bag",
    "metric_summary",
    "paired_difference",
    "run_comparison",
    "run_cross_validation",
    "stratified_bootstrap_weights",
    "weighted_binary_metrics",
    "write_explanations",
    "write_predictions",
]
