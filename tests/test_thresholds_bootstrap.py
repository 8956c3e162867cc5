"""Threshold choice and patient bootstrap: known answers and independent (slow) routes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from lympho_mil.evaluation.bootstrap import (
    OOFArrays,
    binary_metrics,
    metric_summary,
    paired_difference,
    stratified_bootstrap_weights,
    weighted_binary_metrics,
)
from lympho_mil.evaluation.ensemble import ensemble_records
from lympho_mil.evaluation.thresholds import best_balanced_accuracy_threshold, choose_threshold
from lympho_mil.models.metrics import METRIC_NAMES


# -- thresholds -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prob", "label", "expected"),
    [
        ([0.1, 0.2, 0.6, 0.7], [0, 0, 1, 1], 0.5),  # 0.5 separates: keep it
        ([0.55, 0.6, 0.8, 0.9], [0, 0, 1, 1], 0.7),  # the gap (0.6, 0.8): its middle
        ([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], 0.25),
    ],
)
def test_threshold_known_answers(prob: list[float], label: list[int], expected: float) -> None:
    assert best_balanced_accuracy_threshold(prob, label) == pytest.approx(expected)


def test_threshold_tie_goes_to_the_candidate_closest_to_half() -> None:
    # Gaps (0.2, 0.3) and (0.35, 0.45) both give 5/6; the one holding 0.5 gives 2/3.
    prob, label = np.array([0.1, 0.2, 0.3, 0.35, 0.45, 0.8]), np.array([0, 0, 1, 0, 1, 1])
    for t, expected in ((0.25, 5 / 6), (0.4, 5 / 6), (0.5, 2 / 3)):
        assert balanced_accuracy_score(label, prob >= t) == pytest.approx(expected)
    assert best_balanced_accuracy_threshold(prob, label) == pytest.approx(0.4)


@pytest.mark.parametrize("seed", range(8))
def test_threshold_matches_a_brute_force_grid(seed: int) -> None:
    rng = np.random.default_rng(seed)
    label = np.r_[np.zeros(9, int), np.ones(14, int)]
    prob = np.round(np.clip(0.35 * label + rng.normal(0.35, 0.2, len(label)), 0, 1), 2)
    grid = np.linspace(0.0005, 0.9995, 1999)
    predicted = prob[None, :] >= grid[:, None]
    sens = (predicted & (label == 1)).sum(1) / (label == 1).sum()
    spec = (~predicted & (label == 0)).sum(1) / (label == 0).sum()
    bacc = (sens + spec) / 2
    best = np.flatnonzero(np.isclose(bacc, bacc.max()))
    nearest = grid[best[np.argmin(np.abs(grid[best] - 0.5))]]

    chosen = best_balanced_accuracy_threshold(prob, label)
    assert balanced_accuracy_score(label, prob >= chosen) == pytest.approx(bacc.max())
    np.testing.assert_array_equal(prob >= chosen, prob >= nearest)
    assert 0 < chosen < 1


def test_threshold_policies_and_errors() -> None:
    assert choose_threshold("fixed", [0.9, 0.95], [0, 1]) == 0.5
    assert choose_threshold("fixed", [0.9, 0.95], [0, 1], fixed=0.7) == 0.7
    assert choose_threshold("inner_val", [0.55, 0.6, 0.8, 0.9], [0, 0, 1, 1]) == 0.7
    with pytest.raises(ValueError, match="policy"):
        choose_threshold("test_fold", [0.1, 0.9], [0, 1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both classes"):
        best_balanced_accuracy_threshold([0.1, 0.9], [1, 1])


# -- bootstrap ------------------------------------------------------------------------------
def noisy_predictions(seed: int, n: int = 40, repeats: int = 2) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.6).astype(int)
    label[:2] = [0, 1]
    prob = np.round(np.clip(0.3 * label + rng.random((repeats, n)) * 0.7, 0, 1), 1)  # ties
    threshold = rng.uniform(0.4, 0.6, (repeats, 1))
    return label, prob, (prob >= threshold).astype(int)


def test_weighted_metrics_equal_sklearn_on_duplicated_patients() -> None:
    label, prob, predicted = noisy_predictions(0)
    weights = stratified_bootstrap_weights(label, 5, seed=3)
    fast = weighted_binary_metrics(label, prob, predicted, weights)
    for b, w in enumerate(weights):
        rows = np.repeat(np.arange(len(label)), w)
        for r in range(len(prob)):
            slow = binary_metrics(label[rows], prob[r, rows], predicted[r, rows])
            for name in METRIC_NAMES:
                assert fast[name][b, r] == pytest.approx(slow[name]), name


def test_unit_weights_give_the_point_estimate() -> None:
    label, prob, predicted = noisy_predictions(1)
    fast = weighted_binary_metrics(label, prob, predicted, np.ones((1, len(label))))
    for r in range(len(prob)):
        point = binary_metrics(label, prob[r], predicted[r])
        assert {k: v[0, r] for k, v in fast.items()} == pytest.approx(point)


def test_stratified_weights_keep_class_counts_and_are_seeded() -> None:
    label = np.array([0, 1, 1, 0, 1, 1, 1])
    weights = stratified_bootstrap_weights(label, 300, seed=5)
    assert weights.shape == (300, 7)
    np.testing.assert_array_equal(weights[:, label == 0].sum(1), 2)
    np.testing.assert_array_equal(weights[:, label == 1].sum(1), 5)
    np.testing.assert_array_equal(weights, stratified_bootstrap_weights(label, 300, seed=5))
    assert not np.array_equal(weights, stratified_bootstrap_weights(label, 300, seed=6))
    assert weights.std(0).min() > 0  # every patient is sometimes drawn, sometimes not


def oof_frame(label: np.ndarray, prob: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    rows = [
        {
            "repeat": r,
            "id": f"P{i:02d}",
            "label": label[i],
            "probability": prob[r, i],
            "predicted": predicted[r, i],
        }
        for r in range(len(prob))
        for i in range(len(label))
    ]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # order must not matter


def test_metric_summary_matches_a_slow_sklearn_bootstrap() -> None:
    label, prob, predicted = noisy_predictions(2)
    summary = metric_summary(oof_frame(label, prob, predicted), n_resamples=200, seed=7)

    per_repeat = [roc_auc_score(label, p) for p in prob]
    resampled = []
    for w in stratified_bootstrap_weights(label, 200, seed=7):
        rows = np.repeat(np.arange(len(label)), w)
        resampled.append(np.mean([roc_auc_score(label[rows], p[rows]) for p in prob]))
    assert summary["auroc"]["mean"] == pytest.approx(np.mean(per_repeat))
    assert summary["auroc"]["std"] == pytest.approx(np.std(per_repeat, ddof=1))
    low, high = np.percentile(resampled, [2.5, 97.5])
    assert summary["auroc"]["ci95_low"] == pytest.approx(low)
    assert summary["auroc"]["ci95_high"] == pytest.approx(high)
    for name in METRIC_NAMES:
        s = summary[name]
        assert s["ci95_low"] <= s["ci95_high"]
        assert set(s) == {"mean", "std", "ci95_low", "ci95_high"}


def test_metric_summary_of_a_perfect_and_a_constant_model() -> None:
    label = np.array([0, 0, 0, 1, 1, 1, 1])
    perfect = np.tile(label * 0.8 + 0.1, (2, 1))
    s = metric_summary(oof_frame(label, perfect, (perfect >= 0.5).astype(int)), 100, seed=0)
    assert all(s[m]["mean"] == s[m]["ci95_low"] == s[m]["ci95_high"] == 1.0 for m in METRIC_NAMES)
    assert s["balanced_accuracy"]["std"] == 0.0
    constant = np.full((1, 7), 0.7)
    s = metric_summary(oof_frame(label, constant, np.ones((1, 7), int)), 100, seed=0)
    assert s["auroc"]["ci95_low"] == s["auroc"]["ci95_high"] == 0.5
    assert s["balanced_accuracy"]["mean"] == 0.5
    assert s["auroc"]["std"] is None  # one repeat: no spread to report


def test_paired_difference() -> None:
    label, prob, predicted = noisy_predictions(3)
    reference = oof_frame(label, prob, predicted)
    same = paired_difference(reference, reference.copy(), n_resamples=100, seed=0)
    assert all(same[m]["ci95_low"] == same[m]["ci95_high"] == 0.0 for m in METRIC_NAMES)

    better_prob = np.clip(prob + 0.3 * (2 * label - 1), 0, 1)
    better = oof_frame(label, better_prob, (better_prob >= 0.5).astype(int))
    diff = paired_difference(reference, better, n_resamples=200, seed=1)
    expected = np.mean(
        [
            roc_auc_score(label, b) - roc_auc_score(label, p)
            for b, p in zip(better_prob, prob, strict=True)
        ]
    )
    assert diff["auroc"]["mean"] == pytest.approx(expected)
    assert 0 < diff["auroc"]["ci95_low"] <= diff["auroc"]["mean"] <= diff["auroc"]["ci95_high"]


def test_oof_arrays_reject_a_patient_twice_in_a_repeat() -> None:
    label, prob, predicted = noisy_predictions(4, n=6, repeats=1)
    frame = oof_frame(label, prob, predicted)
    with pytest.raises(ValueError, match="exactly once"):
        OOFArrays.from_frame(pd.concat([frame, frame.iloc[:1]]))


# -- fold ensemble ----------------------------------------------------------------------------
def record(pid: str, prob: float, weights: list[float] | None) -> dict:
    n = 2
    return {
        "id": pid,
        "label": -1,
        "probability": prob,
        "threshold": 0.5,
        "n_instances": n,
        "instance_ids": ["a.jpg", "b.jpg"],
        "weights": weights,
        "instance_probability": None,
    }


def test_ensemble_averages_models_and_takes_the_median_threshold() -> None:
    models = [
        [record("P1", 0.2, [0.5, 0.5]), record("P2", 0.9, [1.0, 0.0])],
        [record("P2", 0.7, [0.0, 1.0]), record("P1", 0.6, [0.1, 0.9])],
        [record("P1", 0.4, [0.3, 0.7]), record("P2", 0.5, [0.5, 0.5])],
    ]
    records, info = ensemble_records([0.3, 0.6, 0.5], models)  # median 0.5, mean 0.467
    assert [r["id"] for r in records] == ["P1", "P2"]
    assert records[0]["probability"] == pytest.approx(0.4)
    assert records[1]["probability"] == pytest.approx(0.7)
    assert records[0]["weights"] == pytest.approx([0.3, 0.7])
    assert records[0]["instance_probability"] is None
    assert info["threshold"] == records[0]["threshold"] == 0.5
    assert "median" in info["threshold_rule"]
    with pytest.raises(ValueError, match="every model"):
        ensemble_records([0.5, 0.5], [models[0], models[1][:1]])
