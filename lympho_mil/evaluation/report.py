"""Cross-validation reports: ``cv_report.json``/``.md``, prediction tables, plots, comparisons.

Plots need matplotlib (the optional ``plots`` extra) and are skipped without it.
"""

from __future__ import annotations

import io
import json
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from lympho_mil.evaluation.bootstrap import (
    CI_LEVEL,
    ECE_BINS,
    OOFArrays,
    calibration_summary,
    metric_summary,
    paired_difference,
    stratified_bootstrap_weights,
)
from lympho_mil.evaluation.predictions import PREDICTION_FILES, prediction_files
from lympho_mil.files import atomic_write_files
from lympho_mil.models.metrics import METRIC_NAMES

if TYPE_CHECKING:
    from lympho_mil.evaluation.cv_types import CVResult, CVSettings, FoldRun

REPORT_FILES = (
    "cv_report.json",
    "cv_report.md",
    "oof_predictions.csv",
    "inner_val_predictions.csv",
)
PLOT_FILES = (
    "roc.png",
    "precision_recall.png",
    "calibration.png",
    "per_fold_balanced_accuracy.png",
)
COMPARISON_FILES = ("comparison.json", "comparison.md")
ROC_BAND_RESAMPLES = 500  # enough for a smooth band; the metric CIs use all resamples
VERSIONED = ("lympho-mil", "torch", "lightning", "scikit-learn", "numpy")
CALIBRATION_LABELS = {
    "brier": "Brier score (lower is better)",
    "ece": f"expected calibration error, {ECE_BINS} bins",
}
LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "auroc": "AUROC",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "f1": "F1",
}


def cv_output_names(predict: bool) -> list[str]:
    """Files a cross-validation writes into its folder."""
    return [*REPORT_FILES, *PLOT_FILES, *(PREDICTION_FILES if predict else ())]


def cv_report(
    name: str,
    record: dict[str, Any],
    settings: CVSettings,
    n_patients: int,
    runs: Sequence[FoldRun],
    oof: pd.DataFrame,
    ensemble: dict[str, Any] | None,
) -> dict[str, Any]:
    """The content of ``cv_report.json``.

    Each metric gets ``{mean, std, ci95_low, ci95_high}``: mean and std over the repeats'
    out-of-fold estimates, the interval from a stratified patient bootstrap (percentile).
    ``record`` is what the fold runner records about its configuration (``FoldRunner.record``).
    """
    label = oof.drop_duplicates("id")["label"]
    report: dict[str, Any] = {
        "name": name,
        "n_patients": n_patients,
        "n_tumoral": int((label == 1).sum()),
        "n_reactive": int((label == 0).sum()),
        "folds": settings.folds,
        "repeats": settings.repeats,
        "seed": settings.seed,
        "threshold_policy": settings.threshold_policy,
        "inner_val_fraction": settings.inner_val_fraction,
        "inner_folds": settings.inner_folds,
        **metric_summary(oof, settings.n_bootstrap, settings.seed),
        "calibration": calibration_summary(oof, settings.n_bootstrap, settings.seed),
        "estimates": {
            "mean_std": "over the repeats' out-of-fold estimates (std: sample std, null if 1)",
            "ci95": f"stratified patient bootstrap, {settings.n_bootstrap} resamples, percentile",
        },
        "per_fold": [_fold_entry(run, oof) for run in runs],
    }
    if ensemble is not None:
        report["ensemble"] = ensemble
    report.update(record)
    report["versions"] = _versions()
    report["wall_time_s"] = round(sum(run.seconds for run in runs), 2)
    return report


def _fold_entry(run: FoldRun, oof: pd.DataFrame) -> dict[str, Any]:
    s = run.split
    rows = oof[(oof["repeat"] == s.repeat) & (oof["fold"] == s.fold)]
    return {
        "repeat": s.repeat,
        "fold": s.fold,
        "train_ids": s.train_ids,
        "val_ids": s.val_ids,
        "test_ids": s.test_ids,
        "threshold": run.threshold,
        "balanced_accuracy": float(balanced_accuracy_score(rows["label"], rows["predicted"])),
        "auroc": float(roc_auc_score(rows["label"], rows["probability"])),
        "seconds": round(run.seconds, 2),
    }


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


# -- files ------------------------------------------------------------------------------------
def write_cv_outputs(result: CVResult, out_dir: Path, n_bootstrap: int, seed: int) -> list[Path]:
    """Write the report, prediction tables, plots and ensemble predictions of one config, as
    one (`atomic_write_files`: a failure leaves the earlier files, not a mix).

    The caller has checked that the folder may be written (see ``cross_validate``).
    """
    files: dict[str, str | bytes] = {
        "cv_report.json": _json(result.report),
        "cv_report.md": cv_markdown(result.report),
        "oof_predictions.csv": result.oof.to_csv(index=False),
        "inner_val_predictions.csv": result.inner_val.to_csv(index=False),
    }
    if result.ensemble is not None:
        files.update(prediction_files(result.ensemble))
    files.update(plot_files(result.report, result.oof, n_bootstrap, seed))
    return atomic_write_files({out_dir / n: c for n, c in files.items()}, overwrite=True)


def comparison_table(results: Sequence[CVResult], n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Each model's metrics and its paired difference to the first (same patients, splits)."""
    reference = results[0]
    first = reference.report
    table: dict[str, Any] = {
        "reference": reference.name,
        "models": [r.name for r in results],
        **{k: first[k] for k in ("n_patients", "folds", "repeats", "seed", "threshold_policy")},
        "metrics": {r.name: {m: r.report[m] for m in METRIC_NAMES} for r in results},
        "difference": {},
        "per_split_difference": {},
    }
    for other in results[1:]:
        table["difference"][other.name] = paired_difference(
            reference.oof, other.oof, n_bootstrap, seed
        )
        table["per_split_difference"][other.name] = [
            {
                "repeat": a["repeat"],
                "fold": a["fold"],
                **{m: b[m] - a[m] for m in ("balanced_accuracy", "auroc")},
            }
            for a, b in zip(first["per_fold"], other.report["per_fold"], strict=True)
        ]
    return table


def write_comparison(table: dict[str, Any], out_dir: Path) -> list[Path]:
    """``comparison.json`` and ``comparison.md`` (the caller checked they may be written)."""
    files = {"comparison.json": _json(table), "comparison.md": comparison_markdown(table)}
    return atomic_write_files({out_dir / n: c for n, c in files.items()}, overwrite=True)


def _json(content: dict[str, Any]) -> str:
    return json.dumps(content, indent=2, allow_nan=False) + "\n"


# -- markdown ---------------------------------------------------------------------------------
def _interval(summary: dict[str, Any], number: str = "{:.3f}") -> str:
    return f"[{number.format(summary['ci95_low'])}, {number.format(summary['ci95_high'])}]"


def _metric_table(rows: dict[str, dict[str, Any]], number: str) -> list[str]:
    """Markdown rows: one per model, each metric as ``mean [CI]`` formatted with ``number``."""
    lines = [
        f"| model | {' | '.join(LABELS[m] for m in METRIC_NAMES)} |",
        "|---|" + "---|" * len(METRIC_NAMES),
    ]
    for name, metrics in rows.items():
        cells = " | ".join(
            f"{number.format(metrics[m]['mean'])} {_interval(metrics[m], number)}"
            for m in METRIC_NAMES
        )
        lines.append(f"| {name} | {cells} |")
    return lines


def _std(summary: dict[str, Any]) -> str:
    return "-" if summary["std"] is None else f"{summary['std']:.3f}"


def cv_markdown(report: dict[str, Any]) -> str:
    """A short human summary of ``cv_report.json``."""
    level = round(100 * CI_LEVEL)
    lines = [
        f"# Cross-validation: {report['name']}",
        "",
        f"{report['n_patients']} labelled patients ({report['n_tumoral']} tumoral, "
        f"{report['n_reactive']} reactive); {report['folds']} folds x {report['repeats']} "
        f"repeat{'s' if report['repeats'] != 1 else ''}, seed {report['seed']}; "
        f"threshold policy `{report['threshold_policy']}`.{_bagging(report)}",
        f"Mean and std {report['estimates']['mean_std']}; {level}% CI: "
        f"{report['estimates']['ci95']}.",
        "",
        f"| metric | mean | std | {level}% CI |",
        "|---|---|---|---|",
    ]
    for m in METRIC_NAMES:
        s = report[m]
        lines.append(f"| {LABELS[m]} | {s['mean']:.3f} | {_std(s)} | {_interval(s)} |")
    for m, label in CALIBRATION_LABELS.items():
        s = report["calibration"][m]
        lines.append(f"| {label} | {s['mean']:.3f} | {_std(s)} | {_interval(s)} |")
    lines += [
        "",
        "## Folds",
        "",
        "| repeat | fold | train | val | test | threshold | balanced accuracy | AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in report["per_fold"]:
        lines.append(
            f"| {f['repeat']} | {f['fold']} | {len(f['train_ids'])} | {len(f['val_ids'])} | "
            f"{len(f['test_ids'])} | {f['threshold']:.3f} | {f['balanced_accuracy']:.3f} | "
            f"{f['auroc']:.3f} |"
        )
    if "ensemble" in report:
        e = report["ensemble"]
        lines += [
            "",
            "## Fold ensemble",
            "",
            f"{e['n_patients']} unlabelled patients predicted by {e['n_models']} fold models: "
            f"{e['probability_rule']}; threshold {e['threshold']:.3f} ({e['threshold_rule']}).",
        ]
    return "\n".join(lines) + "\n"


def _bagging(report: dict[str, Any]) -> str:
    """What a fold is, with ``inner_folds`` (nothing without)."""
    k = report.get("inner_folds")
    if k is None:
        return ""
    return (
        f" Each fold: {k} models, each validated on one of {k} inner folds of the fold's "
        "training patients and trained on the others; their mean probability, at a threshold "
        "chosen on their pooled validation predictions (each training patient once)."
    )


def comparison_markdown(table: dict[str, Any]) -> str:
    """A short human summary of ``comparison.json``."""
    level = round(100 * CI_LEVEL)
    lines = [
        f"# Paired comparison (reference: {table['reference']})",
        "",
        f"{table['n_patients']} labelled patients, {table['folds']} folds x {table['repeats']} "
        f"repeats on identical splits (seed {table['seed']}); threshold policy "
        f"`{table['threshold_policy']}`. Cells: mean over repeats [{level}% bootstrap CI].",
        "",
        *_metric_table(table["metrics"], "{:.3f}"),
        "",
        f"## Difference to {table['reference']} (paired by patient and repeat)",
        "",
        *_metric_table(table["difference"], "{:+.3f}"),
    ]
    lines += ["", "Mean per-split difference (outer test folds):", ""]
    for name, rows in table["per_split_difference"].items():
        bacc = np.mean([r["balanced_accuracy"] for r in rows])
        auroc = np.mean([r["auroc"] for r in rows])
        lines.append(f"- {name}: balanced accuracy {bacc:+.3f}, AUROC {auroc:+.3f}")
    return "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------------
def plot_files(
    report: dict[str, Any], oof: pd.DataFrame, n_bootstrap: int, seed: int
) -> dict[str, bytes]:
    """`PLOT_FILES` by name (the ROC with its bootstrap band, the precision-recall curve,
    the reliability diagram, each fold's balanced accuracy); none without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return {}
    return {
        "roc.png": _roc_png(Figure, report, oof, n_bootstrap, seed),
        "precision_recall.png": _precision_recall_png(Figure, report, oof),
        "calibration.png": _calibration_png(Figure, report, oof),
        "per_fold_balanced_accuracy.png": _per_fold_png(Figure, report),
    }


def roc_band(
    oof: pd.DataFrame, n_resamples: int, seed: int, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled out-of-fold ROC (all repeats) on an FPR grid and its bootstrap percentile band.

    Returns:
        float[G] each: true-positive rate, band low, band high at the false-positive rates
        ``grid``.
    """
    arrays = OOFArrays.from_frame(oof)
    repeats = len(arrays.prob)
    label, prob = np.tile(arrays.label, repeats), arrays.prob.ravel()

    def curve(weights: np.ndarray | None) -> np.ndarray:
        fpr, tpr, _ = roc_curve(label, prob, sample_weight=weights)
        return tpr[np.searchsorted(fpr, grid, side="right") - 1]  # best TPR at FPR <= grid

    resamples = stratified_bootstrap_weights(arrays.label, n_resamples, seed)
    curves = np.array([curve(np.tile(weights, repeats)) for weights in resamples])
    tail = 100 * (1 - CI_LEVEL) / 2
    low, high = np.percentile(curves, [tail, 100 - tail], axis=0)
    return curve(None), low, high


def figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def roc_axes(ax: Any, title: str) -> None:
    """The chance diagonal, axis labels and limits of a ROC plot."""
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(
        xlabel="false-positive rate (1 - specificity)",
        ylabel="true-positive rate (sensitivity)",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )


def _roc_png(
    figure_class: Any, report: dict[str, Any], oof: pd.DataFrame, n_bootstrap: int, seed: int
) -> bytes:
    grid = np.linspace(0.0, 1.0, 201)
    tpr, low, high = roc_band(oof, min(n_bootstrap, ROC_BAND_RESAMPLES), seed, grid)
    auroc = report["auroc"]
    fig = figure_class(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    level = round(100 * CI_LEVEL)
    ax.fill_between(grid, low, high, step="post", alpha=0.25, label=f"{level}% bootstrap band")
    ax.step(
        grid,
        tpr,
        where="post",
        label=f"out-of-fold ROC, AUROC {auroc['mean']:.3f} {_interval(auroc)}",
    )
    roc_axes(ax, _title(report))
    ax.legend(loc="lower right", fontsize="small")
    return figure_png(fig)


def _pooled(oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of every repeat's out-of-fold predictions, pooled."""
    arrays = OOFArrays.from_frame(oof)
    return np.tile(arrays.label, len(arrays.prob)), arrays.prob.ravel()


def _title(report: dict[str, Any]) -> str:
    return f"{report['name']}: {report['folds']} folds x {report['repeats']} repeats"


def _precision_recall_png(figure_class: Any, report: dict[str, Any], oof: pd.DataFrame) -> bytes:
    label, prob = _pooled(oof)
    precision, recall, _ = precision_recall_curve(label, prob)
    fig = figure_class(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ap = average_precision_score(label, prob)
    ax.step(recall, precision, where="post", label=f"out-of-fold, average precision {ap:.3f}")
    ax.axhline(label.mean(), linestyle=":", color="grey", label="share of tumoral patients")
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=_title(report),
    )
    ax.legend(loc="lower left", fontsize="small")
    return figure_png(fig)


def reliability_points(
    label: np.ndarray, prob: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width bin of ``prob``: the mean probability, the share of
    tumoral patients and the count (a reliability diagram's points)."""
    bins = np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    filled = count > 0
    mean_prob = np.bincount(bins, prob, n_bins)[filled] / count[filled]
    tumoral = np.bincount(bins, label, n_bins)[filled] / count[filled]
    return mean_prob, tumoral, count[filled]


def reliability_axes(ax: Any, title: str) -> None:
    """The diagonal of perfect calibration, axis labels and limits of a reliability diagram."""
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(
        xlabel="mean predicted probability of tumoral",
        ylabel="share of tumoral patients",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=title,
    )


def _calibration_png(figure_class: Any, report: dict[str, Any], oof: pd.DataFrame) -> bytes:
    label, prob = _pooled(oof)
    mean_prob, tumoral, count = reliability_points(label, prob)
    brier, ece = (report["calibration"][m] for m in ("brier", "ece"))
    fig = figure_class(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(
        mean_prob,
        tumoral,
        "-o",
        label=f"Brier {brier['mean']:.3f} {_interval(brier)}, ECE {ece['mean']:.3f}",
    )
    ax.scatter(mean_prob, tumoral, s=15 + 400 * count / len(prob))
    reliability_axes(ax, _title(report))
    ax.legend(loc="upper left", fontsize="small")
    return figure_png(fig)


def _per_fold_png(figure_class: Any, report: dict[str, Any]) -> bytes:
    folds = report["per_fold"]
    bacc = report["balanced_accuracy"]
    fig = figure_class(figsize=(max(4.5, 0.35 * len(folds)), 3.5))
    ax = fig.add_subplot()
    for repeat in sorted({f["repeat"] for f in folds}):
        index = [i for i, f in enumerate(folds) if f["repeat"] == repeat]
        values = [folds[i]["balanced_accuracy"] for i in index]
        ax.plot(index, values, "o", label=f"repeat {repeat}")
    ax.axhline(bacc["mean"], color="black", label=f"mean {bacc['mean']:.3f}")
    level = round(100 * CI_LEVEL)
    ax.axhspan(bacc["ci95_low"], bacc["ci95_high"], alpha=0.15, color="black", label=f"{level}% CI")
    ax.set(xlabel="outer fold", ylabel="balanced accuracy", ylim=(0, 1.02), title=report["name"])
    ax.set_xticks(range(len(folds)), [f"r{f['repeat']}f{f['fold']}" for f in folds], fontsize=7)
    ax.legend(fontsize="small", loc="lower left")
    return figure_png(fig)
