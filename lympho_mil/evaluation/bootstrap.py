"""Patient-level metrics of out-of-fold predictions and their bootstrap confidence intervals.

Point estimates come from scikit-learn, one per repeat of the cross-validation (each repeat
predicts every patient once). The interval resamples *patients* with replacement, stratified
by label so both classes stay present; a resampled patient keeps all its repeats and each
prediction keeps its own fold's threshold. A resample is a vector of integer weights (how
often each patient was drawn), so all resamples are scored at once with numpy; the weighted
formulas equal scikit-learn's on the duplicated rows (the tests check it).

The same weights score one model on an external cohort (`weighted_cohort_metrics`, which adds
PPV, NPV, Brier score and calibration error) and its rule-out operating point
(`weighted_referral`), for `lympho_mil.evaluation.external`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from lympho_mil.models.metrics import METRIC_NAMES

DEFAULT_RESAMPLES = 2000
CI_LEVEL = 0.95
COHORT_METRIC_NAMES = (
    "balanced_accuracy",
    "auroc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "brier",
    "ece",
)
ECE_BINS = 10


def binary_metrics(label: np.ndarray, prob: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Every metric of `METRIC_NAMES` for one set of predictions (scikit-learn).

    Args:
        label: int[n] 0/1 targets (both classes present, for the AUROC).
        prob: float[n] probabilities.
        predicted: int[n] 0/1 decisions.
    """
    return {
        "balanced_accuracy": float(balanced_accuracy_score(label, predicted)),
        "auroc": float(roc_auc_score(label, prob)),
        "sensitivity": float(recall_score(label, predicted, pos_label=1, zero_division=0)),
        "specificity": float(recall_score(label, predicted, pos_label=0, zero_division=0)),
        "f1": float(f1_score(label, predicted, zero_division=0)),
    }


def stratified_bootstrap_weights(label: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """int[B, n]: how often each patient is drawn in each of ``B`` stratified resamples.

    Each class is resampled with replacement to its own size, so every row sums to ``n`` and
    keeps the class counts of ``label`` (``int[n]``, 0/1). ``seed`` seeds the draw.
    """
    label = np.asarray(label)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_resamples, len(label)), dtype=np.int64)
    for cls in (0, 1):
        members = np.flatnonzero(label == cls)
        if len(members):
            uniform = np.full(len(members), 1.0 / len(members))
            weights[:, members] = rng.multinomial(len(members), uniform, size=n_resamples)
    return weights


def weighted_binary_metrics(
    label: np.ndarray, prob: np.ndarray, predicted: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric for every resample and repeat at once.

    Args:
        label: int[n] 0/1 targets (shared by the repeats).
        prob: float[R, n] probabilities.
        predicted: int[R, n] 0/1 decisions.
        weights: float[B, n] patient weights (bootstrap counts), both classes weighted.

    Returns:
        float[B, R] per metric name.
    """
    pos, neg = np.asarray(label) == 1, np.asarray(label) == 0
    hit = np.asarray(predicted).astype(bool)
    weights = np.asarray(weights, dtype=np.float64)

    def weighted_count(selected: np.ndarray) -> np.ndarray:  # bool[R, n] -> float[B, R]
        return weights @ selected.T.astype(np.float64)

    tp, fn = weighted_count(hit & pos), weighted_count(~hit & pos)
    tn, fp = weighted_count(~hit & neg), weighted_count(hit & neg)
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    # AUROC: weighted share of (positive, negative) pairs ranked right, ties counting half.
    prob = np.asarray(prob, dtype=np.float64)
    p, q = prob[:, pos], prob[:, neg]  # [R, P], [R, Q]
    right = (p[:, :, None] > q[:, None, :]) + 0.5 * (p[:, :, None] == q[:, None, :])
    w_pos, w_neg = weights[:, pos], weights[:, neg]
    pairs = np.einsum("bp,rpq,bq->br", w_pos, right, w_neg, optimize=True)
    auroc = _ratio(pairs, (w_pos.sum(1) * w_neg.sum(1))[:, None])
    return {
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "auroc": auroc,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def weighted_cohort_metrics(
    label: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    weights: np.ndarray,
    n_bins: int = ECE_BINS,
) -> dict[str, np.ndarray]:
    """Every metric of `COHORT_METRIC_NAMES` of one model's decisions ``prob >= threshold``.

    Beyond `weighted_binary_metrics`: PPV and NPV (0 where nothing is predicted in the class),
    the Brier score (mean squared ``prob - label``) and the expected calibration error over
    ``n_bins`` equal-width bins of ``prob`` (the last one closed): the weighted mean over the
    patients of ``|mean prob - share tumoral|`` of their bin.

    Args:
        label: int[n] 0/1 targets.
        prob: float[n] probabilities of the positive class.
        threshold: decision threshold.
        weights: float[B, n] patient weights (bootstrap counts; ``ones[1, n]``: the estimate).

    Returns:
        float[B] per metric name.
    """
    label, prob = np.asarray(label), np.asarray(prob, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    predicted = prob >= threshold
    base = weighted_binary_metrics(label, prob[None], predicted[None], weights)
    pos = label == 1
    tp, fp = weights @ (predicted & pos), weights @ (predicted & ~pos)
    tn, fn = weights @ (~predicted & ~pos), weights @ (~predicted & pos)
    total = weights.sum(1)
    bins = np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)
    gaps = np.abs((weights * (prob - label)) @ np.eye(n_bins)[bins])  # [B, K]
    metrics = {
        **{name: values[:, 0] for name, values in base.items()},
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "brier": weights @ (prob - label) ** 2 / total,
        "ece": gaps.sum(1) / total,
    }
    return {name: metrics[name] for name in COHORT_METRIC_NAMES}


def weighted_referral(
    label: np.ndarray, prob: np.ndarray, target: float, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """The rule-out operating point at sensitivity >= ``target``, on each resample.

    Its threshold is the highest one whose (weighted) share of tumoral patients with
    ``prob >= threshold`` is at least ``target``; it is always a tumoral patient's
    probability. The patients below it could skip flow cytometry.

    Args:
        label: int[n] 0/1 targets (1 tumoral).
        prob: float[n] probabilities of tumoral.
        target: the sensitivity to keep, in (0, 1].
        weights: float[B, n] patient weights (bootstrap counts; ``ones[1, n]``: the estimate).

    Returns:
        float[B] each: ``threshold``, ``skip_fraction`` (share of all patients below it),
        ``sensitivity`` and ``specificity`` (share of reactive patients below it).
    """
    label, prob = np.asarray(label), np.asarray(prob, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    pos = label == 1
    order = np.argsort(prob[pos], kind="stable")
    tumoral_weights = weights[:, pos][:, order]
    at_or_above = np.cumsum(tumoral_weights[:, ::-1], axis=1)[:, ::-1]  # [B, P], non-increasing
    kept = (at_or_above >= target * at_or_above[:, :1] - 1e-9).sum(1) - 1
    threshold = prob[pos][order][kept]
    below = prob[None, :] < threshold[:, None]  # [B, n]
    return {
        "threshold": threshold,
        "skip_fraction": (weights * below).sum(1) / weights.sum(1),
        "sensitivity": 1 - _ratio((weights * (below & pos)).sum(1), weights[:, pos].sum(1)),
        "specificity": _ratio((weights * (below & ~pos)).sum(1), weights[:, ~pos].sum(1)),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den`` is 0 (scikit-learn's ``zero_division=0``)."""
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


@dataclass(frozen=True)
class OOFArrays:
    """Out-of-fold predictions as arrays: one column per patient, one row per repeat.

    ids: the n patient ids (sorted); label: int[n]; prob: float[R, n]; predicted: int[R, n].
    """

    ids: list[str]
    label: np.ndarray
    prob: np.ndarray
    predicted: np.ndarray

    @classmethod
    def from_frame(cls, oof: pd.DataFrame) -> OOFArrays:
        """From rows ``repeat, id, label, probability, predicted`` (each patient once a repeat)."""
        counts = oof.groupby(["repeat", "id"]).size()
        if (counts != 1).any():
            raise ValueError("each patient must be predicted exactly once per repeat")
        prob = oof.pivot(index="repeat", columns="id", values="probability").sort_index()
        if prob.isna().any().any():
            raise ValueError("every repeat must predict the same patients")
        predicted = oof.pivot(index="repeat", columns="id", values="predicted").sort_index()
        label = oof.groupby("id")["label"].agg(["min", "max"])
        if (label["min"] != label["max"]).any():
            raise ValueError("a patient has different labels across repeats")
        return cls(
            ids=list(prob.columns),
            label=label.loc[prob.columns, "min"].to_numpy(dtype=np.int64),
            prob=prob.to_numpy(dtype=np.float64),
            predicted=predicted[prob.columns].to_numpy(dtype=np.int64),
        )

    def per_repeat(self) -> dict[str, np.ndarray]:
        """float[R] per metric: each repeat's out-of-fold estimate (scikit-learn)."""
        rows = [
            binary_metrics(self.label, p, d) for p, d in zip(self.prob, self.predicted, strict=True)
        ]
        return {name: np.array([row[name] for row in rows]) for name in METRIC_NAMES}

    def resampled(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """float[B] per metric: the repeat-averaged estimate on each bootstrap resample."""
        metrics = weighted_binary_metrics(self.label, self.prob, self.predicted, weights)
        return {name: values.mean(axis=1) for name, values in metrics.items()}


def percentile_interval(resampled: np.ndarray) -> tuple[float, float]:
    """The `CI_LEVEL` percentile interval of bootstrap estimates ``float[B]``."""
    tail = 100 * (1 - CI_LEVEL) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def summarize(per_repeat: np.ndarray, resampled: np.ndarray) -> dict[str, float | None]:
    """``{mean, std, ci95_low, ci95_high}``: mean and sample std over the repeats (std is None
    with one repeat) and the percentile interval of the bootstrap resamples."""
    low, high = percentile_interval(resampled)
    return {
        "mean": float(np.mean(per_repeat)),
        "std": float(np.std(per_repeat, ddof=1)) if len(per_repeat) > 1 else None,
        "ci95_low": float(low),
        "ci95_high": float(high),
    }


def metric_summary(
    oof: pd.DataFrame, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict[str, dict[str, float | None]]:
    """Per metric, ``{mean, std, ci95_low, ci95_high}`` of out-of-fold predictions (rows as in
    `OOFArrays.from_frame`): mean and sample std over the repeats (std None with one
    repeat), and the 95 % percentile interval of ``n_resamples`` stratified patient bootstrap
    resamples drawn with ``seed``."""
    arrays = OOFArrays.from_frame(oof)
    weights = stratified_bootstrap_weights(arrays.label, n_resamples, seed)
    per_repeat, resampled = arrays.per_repeat(), arrays.resampled(weights)
    return {name: summarize(per_repeat[name], resampled[name]) for name in METRIC_NAMES}


def calibration_summary(
    oof: pd.DataFrame, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict[str, dict[str, float | None]]:
    """The Brier score and the expected calibration error (`weighted_cohort_metrics`) of
    out-of-fold probabilities, ``{mean, std, ci95_low, ci95_high}`` each, as `metric_summary`
    gives its metrics (the same resamples for the same ``seed``)."""
    arrays = OOFArrays.from_frame(oof)
    weights = stratified_bootstrap_weights(arrays.label, n_resamples, seed)
    ones = np.ones((1, len(arrays.label)))
    summary = {}
    for name in ("brier", "ece"):
        per_repeat, resampled = [], []
        for prob in arrays.prob:  # the threshold plays no part in either
            per_repeat.append(weighted_cohort_metrics(arrays.label, prob, 0.5, ones)[name][0])
            resampled.append(weighted_cohort_metrics(arrays.label, prob, 0.5, weights)[name])
        summary[name] = summarize(np.array(per_repeat), np.mean(resampled, axis=0))
    return summary


def paired_difference(
    reference: pd.DataFrame,
    other: pd.DataFrame,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """Per metric, ``{mean, std, ci95_low, ci95_high}`` of ``other - reference`` on the same
    patients and splits (frames as in `OOFArrays.from_frame`).

    Both models are scored on the same bootstrap resamples of patients, so the interval is
    that of the paired difference (narrower than comparing two separate intervals). Raises
    ValueError when the two frames differ in patients, repeats or labels.
    """
    ref, oth = OOFArrays.from_frame(reference), OOFArrays.from_frame(other)
    if ref.ids != oth.ids or len(ref.prob) != len(oth.prob):
        raise ValueError("paired comparison needs the same patients and repeats in both")
    if not np.array_equal(ref.label, oth.label):
        raise ValueError("paired comparison: the two prediction tables disagree on labels")
    weights = stratified_bootstrap_weights(ref.label, n_resamples, seed)
    ref_rep, oth_rep = ref.per_repeat(), oth.per_repeat()
    ref_boot, oth_boot = ref.resampled(weights), oth.resampled(weights)
    return {
        name: summarize(oth_rep[name] - ref_rep[name], oth_boot[name] - ref_boot[name])
        for name in METRIC_NAMES
    }
