"""Averaged models: the fold models of a cross-validation on unlabelled patients (the fold
ensemble), and the members of one fold (``inner_folds``, a bagged fold)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from lympho_mil.evaluation.cv_types import FoldRun, FoldSplit
from lympho_mil.evaluation.thresholds import ThresholdPolicy, choose_on_validation

THRESHOLD_RULE = "median of the fold thresholds"
PROBABILITY_RULE = "mean of the fold models' probabilities"


def ensemble_records(
    thresholds: Sequence[float], predictions: Sequence[Sequence[dict[str, Any]]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Average the ``predict_step`` records of several models on the same patients.

    Probabilities, crop weights and crop probabilities (where present) are averaged over the
    models; the decision threshold is the median of the models' thresholds. A patient is in
    sample when any model trained or validated on it (unknown when none says so).

    Args:
        thresholds: each model's decision threshold.
        predictions: each model's records (one per patient).

    Returns:
        Records in the ``predict_step`` format (for
        `write_predictions`), one per patient sorted
        by id, and a summary of the rules for the report.
    """
    if not predictions or len(thresholds) != len(predictions):
        raise ValueError("need one threshold per model and at least one model")
    threshold = float(statistics.median(thresholds))
    by_id: dict[str, list[dict[str, Any]]] = {}
    for records in predictions:
        for record in records:
            by_id.setdefault(record["id"], []).append(record)
    incomplete = [pid for pid, parts in by_id.items() if len(parts) != len(predictions)]
    if incomplete:
        raise ValueError(f"patients not predicted by every model: {sorted(incomplete)[:10]}")
    averaged = [
        {
            **parts[0],
            "probability": statistics.fmean(p["probability"] for p in parts),
            "threshold": threshold,
            "weights": _mean_lists([p["weights"] for p in parts]),
            "instance_probability": _mean_lists([p["instance_probability"] for p in parts]),
            "in_sample": _any_known([p.get("in_sample") for p in parts]),
        }
        for pid, parts in sorted(by_id.items())
    ]
    summary = {
        "n_models": len(predictions),
        "n_patients": len(averaged),
        "threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "probability_rule": PROBABILITY_RULE,
    }
    return averaged, summary


def _any_known(flags: list[bool | None]) -> bool | None:
    """True if any flag is, False if all known ones are not, None if none is known."""
    known = [f for f in flags if f is not None]
    return any(known) if known else None


def _mean_lists(values: list[list[float] | None]) -> list[float] | None:
    """Element-wise mean of equal-length lists; None if any is None."""
    if any(v is None for v in values):
        return None
    return [statistics.fmean(column) for column in zip(*values, strict=True)]


def bag_fold(members: Sequence[FoldRun], policy: ThresholdPolicy) -> tuple[FoldRun, dict[str, Any]]:
    """One fold's members (``inner_folds``: each validated on its own inner fold) as one run,
    and the notes of its threshold for the members' checkpoints (`choose_on_validation`'s,
    with ``pooled_over``: the number of members whose validation it was chosen on).

    Its test and unlabelled predictions are the members' averaged (`ensemble_records`); its
    threshold is chosen by ``policy`` on the members' pooled validation predictions, each
    training patient predicted once, by the member that did not train on it ("fixed": the
    members' threshold setting, which their validation records carry, predicted before any
    threshold was chosen). Its split trains and validates on every training patient.
    """
    first = members[0].split
    if any((m.split.repeat, m.split.fold) != (first.repeat, first.fold) for m in members):
        raise ValueError("bag_fold takes the members of one fold")
    val = [record for member in members for record in member.val]
    threshold, notes = pooled_choice(policy, val, len(members))
    thresholds = [threshold] * len(members)
    test, _ = ensemble_records(thresholds, [m.test for m in members])
    unlabelled = None
    if members[0].unlabelled is not None:
        unlabelled, _ = ensemble_records(thresholds, [m.unlabelled or [] for m in members])
    patients = sorted(r["id"] for r in val)
    split = FoldSplit(first.repeat, first.fold, patients, patients, first.test_ids)
    seconds = sum(m.seconds for m in members)
    return FoldRun(split, threshold, val, test, unlabelled, seconds), notes


def pooled_choice(
    policy: ThresholdPolicy, val: Sequence[dict[str, Any]], n_members: int
) -> tuple[float, dict[str, Any]]:
    """The threshold of a bag of ``n_members`` models, chosen by ``policy`` on their pooled
    validation records ``val`` (`choose_on_validation`, "fixed": their threshold setting),
    as the members' models (float32) apply it; and its notes, marked ``pooled_over``."""
    chosen, notes = choose_on_validation(policy, val, fixed=threshold_setting(val))
    threshold = float(np.float32(chosen))
    notes["threshold"] |= {"value": threshold, "pooled_over": n_members}
    return threshold, notes


def threshold_setting(val: Sequence[dict[str, Any]]) -> float:
    """The threshold setting of the models that made these validation records (each record
    carries the threshold its model held: the setting, before a threshold was chosen)."""
    settings = {float(record["threshold"]) for record in val}
    if len(settings) != 1:
        raise ValueError(f"validation records of models with other threshold settings: {settings}")
    return settings.pop()
