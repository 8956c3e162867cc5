"""Decision thresholds chosen without the patients they will be scored on.

Policy ``"fixed"`` keeps 0.5. Policy ``"inner_val"`` maximises the balanced accuracy of the
inner-validation probabilities; balanced accuracy only changes where the threshold crosses a
probability, so the candidates are 0.5 and the midpoints between consecutive distinct
probabilities (plus one below the lowest and one above the highest). Ties go to the candidate
closest to 0.5, which keeps the choice stable when the validation set is small.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

ThresholdPolicy = Literal["fixed", "inner_val"]
THRESHOLD_POLICIES: tuple[str, ...] = ("fixed", "inner_val")
DEFAULT_THRESHOLD = 0.5


def threshold_candidates(prob: Sequence[float] | np.ndarray) -> np.ndarray:
    """float[K]: 0.5 and one threshold inside each gap between distinct probabilities."""
    levels = np.unique(np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0))
    edges = np.concatenate([[0.0], levels, [1.0]])
    midpoints = (edges[:-1] + edges[1:]) / 2
    inside = midpoints[(midpoints > 0.0) & (midpoints < 1.0)]
    return np.unique(np.append(inside, DEFAULT_THRESHOLD))


def best_balanced_accuracy_threshold(prob: Sequence[float], label: Sequence[int]) -> float:
    """The threshold in (0, 1) that maximises balanced accuracy of ``prob >= t``.

    Args:
        prob: float[n], predicted probabilities of the positive class.
        label: int[n], 0/1 targets (both classes present, else ValueError).
    """
    prob_arr, label_arr = np.asarray(prob, dtype=np.float64), np.asarray(label)
    if prob_arr.shape != label_arr.shape or prob_arr.ndim != 1:
        raise ValueError(f"prob and label must be 1-D of one length, got {prob_arr.shape}")
    if set(np.unique(label_arr).tolist()) != {0, 1}:
        raise ValueError("choosing a threshold needs patients of both classes")
    candidates = threshold_candidates(prob_arr)
    scores = np.array([balanced_accuracy_score(label_arr, prob_arr >= t) for t in candidates])
    best = np.flatnonzero(np.isclose(scores, scores.max()))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - DEFAULT_THRESHOLD))]])


def choose_threshold(
    policy: ThresholdPolicy,
    prob: Sequence[float],
    label: Sequence[int],
    fixed: float = DEFAULT_THRESHOLD,
) -> float:
    """The decision threshold of a fold from its inner-validation predictions only.

    Args:
        policy: "fixed" (``fixed``, the predictions unused) or "inner_val"
            (`best_balanced_accuracy_threshold`); anything else raises ValueError.
        prob: float[n], inner-validation probabilities.
        label: int[n], their 0/1 targets.
        fixed: the threshold of the "fixed" policy (``cv``: the model's own setting).
    """
    if policy == "fixed":
        return fixed
    if policy == "inner_val":
        return best_balanced_accuracy_threshold(prob, label)
    raise ValueError(f"threshold policy must be one of {THRESHOLD_POLICIES}, got {policy!r}")


def choose_on_validation(
    policy: ThresholdPolicy, records: Sequence[dict[str, Any]], fixed: float = DEFAULT_THRESHOLD
) -> tuple[float, dict[str, Any]]:
    """The threshold of a model from its ``predict_step`` records of its validation patients
    (`choose_threshold`), and what its checkpoint records about it: ``threshold`` (value,
    policy, number of patients, their balanced accuracy at it; ``reason`` when "inner_val"
    fell back to ``fixed``: patients of one class) and ``validation`` (their balanced
    accuracy and AUROC at the setting ``fixed``, as training scored them)."""
    prob = np.array([r["probability"] for r in records], dtype=np.float64)
    label = np.array([r["label"] for r in records])
    reason = None
    if policy == "inner_val" and set(label.tolist()) != {0, 1}:
        policy, reason = "fixed", "its validation patients are not of both classes"
    value = choose_threshold(policy, prob.tolist(), label.tolist(), fixed)
    scores = {"val_balanced_accuracy": float(balanced_accuracy_score(label, prob >= fixed))}
    if len(set(label.tolist())) == 2:
        scores["val_auroc"] = float(roc_auc_score(label, prob))
    chosen = {
        "value": value,
        "policy": policy,
        "n_patients": len(records),
        "balanced_accuracy": float(balanced_accuracy_score(label, prob >= value)),
        **({"reason": reason} if reason else {}),
    }
    return value, {"threshold": chosen, "validation": scores}
