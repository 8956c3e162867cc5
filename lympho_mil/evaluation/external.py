"""External validation: one or several models scored on the same labelled cohort.

`evaluate_predictions` takes each model's per-patient predictions and writes, into one new
folder, ``evaluation.json`` (everything), ``evaluation.md`` (the tables), the figures and
``report.html`` (one page for a browser). Every figure has a stratified patient-bootstrap
interval; the models are resampled together, so their differences are paired.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lympho_mil.arguments import SettingError
from lympho_mil.data.errors import DataError
from lympho_mil.evaluation.bootstrap import (
    COHORT_METRIC_NAMES,
    DEFAULT_RESAMPLES,
    percentile_interval,
    stratified_bootstrap_weights,
    weighted_cohort_metrics,
    weighted_referral,
)
from lympho_mil.evaluation.external_plots import PLOT_FILES, evaluation_figures
from lympho_mil.evaluation.external_report import markdown, render_html, report_sections
from lympho_mil.evaluation.thresholds import best_balanced_accuracy_threshold
from lympho_mil.files import atomic_write_folder, check_writable

REQUIRED_COLUMNS = ("id", "label", "probability", "threshold", "n_instances")
REFERRAL_SENSITIVITIES = (0.95, 0.98)
COMPARED_METRICS = ("balanced_accuracy", "auroc")
BOOTSTRAP_METHOD = "stratified patient bootstrap (each class resampled to its own size)"
EVALUATION_FILES = ("evaluation.json", "evaluation.md", "report.html", *PLOT_FILES)
REFITTED = "refitted on this cohort: the threshold that maximises its balanced accuracy"


@dataclass(frozen=True)
class ModelPredictions:
    """One model's predictions on the cohort.

    Attributes:
        name: the model's name in the report (unique among the models evaluated together).
        table: one row a patient: ``id``; ``label`` (1 tumoral, 0 reactive, -1 unknown: left
            out); ``probability`` of tumoral; ``threshold`` (the model's, one value);
            ``n_instances`` (crops read); optional ``montage`` (path of the patient's montage,
            relative to the working directory, empty where none) and ``in_sample`` (True for a
            patient the model was trained on: marked in the report, still scored).
            ``predict``'s ``predictions_detail.csv`` has the required columns.
        threshold_source: where ``threshold`` came from, e.g. ``"checkpoint runs/best.ckpt"``.
    """

    name: str
    table: pd.DataFrame
    threshold_source: str = "checkpoint"


def evaluate_predictions(
    models: Sequence[ModelPredictions],
    out_dir: str | Path,
    *,
    refit_threshold: bool = False,
    referral_sensitivities: Sequence[float] = REFERRAL_SENSITIVITIES,
    n_bootstrap: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score ``models`` on their labelled patients and write the report into ``out_dir``.

    Each model is scored at its own threshold (the table's), or with ``refit_threshold`` at
    the one that maximises balanced accuracy on this cohort (optimistic; the report says
    so). For each sensitivity of ``referral_sensitivities``, the referral view sets the
    highest threshold that keeps that share of the tumoral patients at or above it (on this
    cohort, and again in each resample) and reports the share of patients below it, who
    could skip flow cytometry. Intervals: ``n_bootstrap`` stratified patient resamples
    drawn with ``seed`` (95 % percentile). The first model is the reference of the paired
    differences.

    Nothing is written when anything fails: `DataError` for bad predictions (no labelled
    patient, one class only, models that predicted different patients, ...), `SettingError`
    for bad arguments, `lympho_mil.files.OutputExistsError` for earlier outputs in
    ``out_dir`` unless ``overwrite``.

    Returns:
        The content of ``evaluation.json``.
    """
    check_settings([m.name for m in models], referral_sensitivities, n_bootstrap)
    out_dir = Path(out_dir)
    check_writable([out_dir / name for name in EVALUATION_FILES], overwrite)  # before the work
    tables = [_checked_table(m) for m in models]
    label = _cohort_labels(models, tables)
    report = _report(
        models, tables, label, refit_threshold, referral_sensitivities, n_bootstrap, seed
    )
    report["patients"] = _patient_rows(models, tables, report, out_dir)
    probs = {
        m.name: t["probability"].to_numpy(np.float64) for m, t in zip(models, tables, strict=True)
    }
    figures = evaluation_figures(label, probs, report, n_bootstrap, seed)
    sections = report_sections(report)
    files = {
        "evaluation.json": (json.dumps(report, indent=2, allow_nan=False) + "\n").encode(),
        "evaluation.md": markdown(report, sections, list(figures)).encode(),
        "report.html": render_html(report, sections, figures).encode(),
        **figures,
    }
    atomic_write_folder(out_dir, files, overwrite, replaces=EVALUATION_FILES)
    return report


# -- checks -----------------------------------------------------------------------------------
def check_settings(names: Sequence[str], sensitivities: Sequence[float], n_bootstrap: int) -> None:
    """`SettingError` for no model, model names that are not unique, ``n_bootstrap < 1`` or
    a referral sensitivity outside (0, 1]."""
    if not names:
        raise SettingError("evaluation needs the predictions of at least one model")
    if len(set(names)) != len(names) or not all(names):
        raise SettingError(f"model names must be unique and non-empty, got {names}")
    if n_bootstrap < 1:
        raise SettingError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not sensitivities or not all(0 < s <= 1 for s in sensitivities):
        raise SettingError(f"referral sensitivities must be in (0, 1], got {list(sensitivities)}")


def _checked_table(model: ModelPredictions) -> pd.DataFrame:
    """The model's labelled patients sorted by id; DataError naming the first fault."""
    table, name = model.table, model.name
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"predictions of {name}: column(s) {missing} missing")
    numeric = {c: pd.to_numeric(table[c], errors="coerce") for c in REQUIRED_COLUMNS[1:]}
    table = table.assign(id=table["id"].astype(str), **numeric)
    twice = table["id"][table["id"].duplicated()]
    if len(twice):
        raise DataError(f"predictions of {name}: patient {twice.iloc[0]} appears twice")
    for column, valid in (
        ("label", table["label"].isin([-1, 0, 1])),
        ("probability", table["probability"].between(0, 1)),
        ("n_instances", table["n_instances"].ge(0)),
    ):
        if not valid.all():
            row = model.table[~valid.to_numpy()].iloc[0]
            raise DataError(
                f"predictions of {name}: patient {row['id']} has {column} {row[column]}"
            )
    thresholds = table["threshold"].unique().tolist()
    if len(thresholds) != 1 or not 0 <= thresholds[0] <= 1:
        raise DataError(f"predictions of {name}: need one threshold in [0, 1], got {thresholds}")
    return table[table["label"] != -1].sort_values("id", ignore_index=True)


def _cohort_labels(models: Sequence[ModelPredictions], tables: list[pd.DataFrame]) -> np.ndarray:
    """int[n] labels of the labelled patients, which every model must have predicted."""
    first, reference = models[0].name, tables[0]
    for model, table in zip(models[1:], tables[1:], strict=True):
        only_first = sorted(set(reference["id"]) - set(table["id"]))
        only_other = sorted(set(table["id"]) - set(reference["id"]))
        if only_first or only_other:
            raise DataError(
                f"{first} and {model.name} predicted different labelled patients: only in "
                f"{first}: {only_first[:5]}, only in {model.name}: {only_other[:5]}"
            )
        differ = table["label"] != reference["label"]
        if differ.any():
            raise DataError(
                f"{first} and {model.name} give patient {table['id'][differ].iloc[0]} "
                "different labels"
            )
    label = reference["label"].to_numpy(np.int64)
    if not len(label):
        raise DataError("no labelled patient: every label is -1 (unknown)")
    if len(np.unique(label)) < 2:
        kind = "tumoral (1)" if label[0] == 1 else "reactive (0)"
        raise DataError(f"every labelled patient is {kind}: the metrics need both classes")
    return label


def _in_sample(table: pd.DataFrame) -> pd.Series:
    """bool per patient: True where the model was trained on it."""
    if "in_sample" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["in_sample"].eq(True)


def _montage_link(value: Any, out_dir: Path, where: str) -> str | None:
    """The montage's path relative to ``out_dir`` (None where none is given)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return None
    path = Path(value)
    if not path.is_file():
        raise DataError(f"{where}: montage {path} is not a file")
    return Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()


# -- estimates --------------------------------------------------------------------------------
def _estimate(point: np.ndarray, resampled: np.ndarray) -> dict[str, float]:
    """``{estimate, ci95_low, ci95_high}`` from float[1] and float[B]."""
    low, high = percentile_interval(resampled)
    return {"estimate": float(point[0]), "ci95_low": low, "ci95_high": high}


def _report(
    models: Sequence[ModelPredictions],
    tables: list[pd.DataFrame],
    label: np.ndarray,
    refit: bool,
    sensitivities: Sequence[float],
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    weights = stratified_bootstrap_weights(label, n_bootstrap, seed)
    ones = np.ones((1, len(label)))
    entries: dict[str, Any] = {}
    scores: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for model, table in zip(models, tables, strict=True):
        prob = table["probability"].to_numpy(np.float64)
        given = float(table["threshold"].iloc[0])
        threshold = best_balanced_accuracy_threshold(prob, label.tolist()) if refit else given
        point = weighted_cohort_metrics(label, prob, threshold, ones)
        resampled = weighted_cohort_metrics(label, prob, threshold, weights)
        scores[model.name] = point, resampled
        entries[model.name] = {
            "threshold": threshold,
            "threshold_source": REFITTED if refit else model.threshold_source,
            "model_threshold": given,
            "model_threshold_source": model.threshold_source,
            "n_in_sample": int(_in_sample(table).sum()),
            "metrics": {m: _estimate(point[m], resampled[m]) for m in COHORT_METRIC_NAMES},
            "referral": [_referral(label, prob, target, weights, ones) for target in sensitivities],
        }
    reference = models[0].name
    ref_point, ref_resampled = scores[reference]
    return {
        "n_patients": len(label),
        "n_tumoral": int(label.sum()),
        "n_reactive": int((label == 0).sum()),
        "n_unlabelled_left_out": int(models[0].table["label"].eq(-1).sum()),
        "threshold_refitted": refit,
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "method": BOOTSTRAP_METHOD},
        "models": entries,
        "comparison": {
            "reference": reference,
            "differences": {
                name: {
                    m: _estimate(point[m] - ref_point[m], resampled[m] - ref_resampled[m])
                    for m in COMPARED_METRICS
                }
                for name, (point, resampled) in list(scores.items())[1:]
            },
        },
    }


def _referral(
    label: np.ndarray, prob: np.ndarray, target: float, weights: np.ndarray, ones: np.ndarray
) -> dict[str, Any]:
    point = weighted_referral(label, prob, target, ones)
    resampled = weighted_referral(label, prob, target, weights)
    below = prob < point["threshold"][0]
    return {
        "target_sensitivity": target,
        "n_skip": int(below.sum()),
        "n_tumoral_missed": int((below & (label == 1)).sum()),
        **{name: _estimate(point[name], resampled[name]) for name in point},
    }


def _patient_rows(
    models: Sequence[ModelPredictions],
    tables: list[pd.DataFrame],
    report: dict[str, Any],
    out_dir: Path,
) -> list[dict[str, Any]]:
    """One entry a patient, the reference model's most suspicious first."""
    rows = [
        {"id": pid, "label": int(lab), "models": {}}
        for pid, lab in zip(tables[0]["id"], tables[0]["label"], strict=True)
    ]
    for model, table in zip(models, tables, strict=True):
        threshold = report["models"][model.name]["threshold"]
        montages = table["montage"] if "montage" in table.columns else [None] * len(table)
        for row, prob, n, in_sample, montage in zip(
            rows,
            table["probability"],
            table["n_instances"],
            _in_sample(table),
            montages,
            strict=True,
        ):
            row["models"][model.name] = {
                "probability": float(prob),
                "decision": "tumoral" if prob >= threshold else "reactive",
                "n_instances": int(n),
                "in_sample": bool(in_sample),
                "montage": _montage_link(montage, out_dir, f"{model.name}, patient {row['id']}"),
            }
    reference = models[0].name
    return sorted(rows, key=lambda r: (-r["models"][reference]["probability"], r["id"]))
