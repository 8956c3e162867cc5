"""Evaluation: prediction files, cross-validation, thresholds, confidence intervals, reports."""

from lympho_mil.evaluation.predictions import PredictionWriter, write_predictions

__all__ = ["PredictionWriter", "write_predictions"]
