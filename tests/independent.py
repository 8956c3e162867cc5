"""The cohort figures computed independently of lympho-mil (scikit-learn and a few lines of
numpy), which the evaluation tests compare its reports with."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)


def ece(label: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width bins (the last one closed)."""
    total = 0.0
    for k in range(bins):
        upper = prob <= 1.0 if k == bins - 1 else prob < (k + 1) / bins
        inside = (prob >= k / bins) & upper
        if inside.any():
            total += inside.mean() * abs(prob[inside].mean() - label[inside].mean())
    return total


def sklearn_metrics(label: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """The nine metrics of an evaluation report, at ``threshold``."""
    decided = (prob >= threshold).astype(int)
    return {
        "balanced_accuracy": balanced_accuracy_score(label, decided),
        "auroc": roc_auc_score(label, prob),
        "sensitivity": recall_score(label, decided),
        "specificity": recall_score(label, decided, pos_label=0),
        "ppv": precision_score(label, decided, zero_division=0),
        "npv": precision_score(label, decided, pos_label=0, zero_division=0),
        "f1": f1_score(label, decided),
        "brier": brier_score_loss(label, prob),
        "ece": ece(label, prob),
    }
