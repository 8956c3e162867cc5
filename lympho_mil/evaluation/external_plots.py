"""Figures of an external validation as PNG bytes (matplotlib, the optional ``plots`` extra).

Each figure shows every model evaluated: one colour a model (ROC, reliability) or one panel
a model, one under the other (probabilities, threshold sweep).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from lympho_mil.evaluation.bootstrap import ECE_BINS
from lympho_mil.evaluation.report import (
    ROC_BAND_RESAMPLES,
    figure_png,
    reliability_axes,
    reliability_points,
    roc_axes,
    roc_band,
)

PLOT_CAPTIONS = {
    "roc.png": "ROC curve of each model with its 95% bootstrap band; dot: the operating point "
    "at the model's threshold.",
    "reliability.png": f"Reliability: the share of tumoral patients against the mean "
    f"probability in each of {ECE_BINS} equal-width bins (marker area: patients in the bin); "
    "the diagonal is perfect calibration.",
    "probabilities.png": "The probability of tumoral by true class; solid line: the model's "
    "threshold, dotted: the referral thresholds.",
    "threshold_sweep.png": "Sensitivity and specificity as the threshold moves; solid line: "
    "the model's threshold, dotted: the referral thresholds.",
}
PLOT_FILES = tuple(PLOT_CAPTIONS)


def evaluation_figures(
    label: np.ndarray,
    probs: Mapping[str, np.ndarray],
    report: dict[str, Any],
    n_bootstrap: int,
    seed: int,
) -> dict[str, bytes]:
    """PNG bytes by file name of `PLOT_FILES`; empty without matplotlib.

    Args:
        label: int[n] 0/1 targets.
        probs: float[n] probabilities of tumoral, by model name (in the report's order).
        report: the evaluation (thresholds, metrics, referral points of each model).
        n_bootstrap, seed: resamples (at most `ROC_BAND_RESAMPLES`) of the ROC band.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return {}
    models = report["models"]
    return {
        "roc.png": _roc(Figure(figsize=(5, 5)), label, probs, models, n_bootstrap, seed),
        "reliability.png": _reliability(Figure(figsize=(5, 5)), label, probs, models),
        "probabilities.png": _per_model(Figure, label, probs, models, _histogram),
        "threshold_sweep.png": _per_model(Figure, label, probs, models, _sweep),
    }


def _roc(
    fig: Any,
    label: np.ndarray,
    probs: Mapping[str, np.ndarray],
    models: dict[str, Any],
    n_bootstrap: int,
    seed: int,
) -> bytes:
    grid = np.linspace(0.0, 1.0, 201)
    ax = fig.add_subplot()
    for i, (name, prob) in enumerate(probs.items()):
        frame = pd.DataFrame(
            {"repeat": 0, "id": [f"{j:06d}" for j in range(len(label))], "label": label}
        ).assign(probability=prob, predicted=0)
        tpr, low, high = roc_band(frame, min(n_bootstrap, ROC_BAND_RESAMPLES), seed, grid)
        metrics = models[name]["metrics"]
        auroc = metrics["auroc"]
        ax.fill_between(grid, low, high, step="post", alpha=0.2, color=f"C{i}")
        ax.step(
            grid,
            tpr,
            where="post",
            color=f"C{i}",
            label=f"{name}: AUROC {auroc['estimate']:.3f} "
            f"[{auroc['ci95_low']:.3f}, {auroc['ci95_high']:.3f}]",
        )
        ax.plot(
            1 - metrics["specificity"]["estimate"],
            metrics["sensitivity"]["estimate"],
            "o",
            color=f"C{i}",
            markeredgecolor="black",
            label=f"{name}: threshold {models[name]['threshold']:.3f}",
        )
    roc_axes(ax, "ROC with 95% bootstrap band")
    ax.legend(loc="lower right", fontsize="small")
    return figure_png(fig)


def _reliability(
    fig: Any, label: np.ndarray, probs: Mapping[str, np.ndarray], models: dict[str, Any]
) -> bytes:
    ax = fig.add_subplot()
    for i, (name, prob) in enumerate(probs.items()):
        mean_prob, tumoral, count = reliability_points(label, prob)
        ece = models[name]["metrics"]["ece"]["estimate"]
        ax.plot(mean_prob, tumoral, "-", color=f"C{i}", label=f"{name}: ECE {ece:.3f}")
        ax.scatter(mean_prob, tumoral, s=15 + 400 * count / len(prob), color=f"C{i}")
    reliability_axes(ax, "Reliability diagram")
    ax.legend(loc="upper left", fontsize="small")
    return figure_png(fig)


def _per_model(
    figure_class: Any,
    label: np.ndarray,
    probs: Mapping[str, np.ndarray],
    models: dict[str, Any],
    panel: Any,
) -> bytes:
    """One panel a model, drawn by ``panel(ax, label, prob)``, with the model's threshold
    (solid) and its referral thresholds (dotted) marked."""
    fig = figure_class(figsize=(5, 3.4 * len(probs)), layout="constrained")
    axes = fig.subplots(len(probs), 1, squeeze=False)[:, 0]
    for ax, (name, prob) in zip(axes, probs.items(), strict=True):
        panel(ax, label, prob)
        entry = models[name]
        ax.axvline(entry["threshold"], color="black", linewidth=1)
        for referral in entry["referral"]:
            ax.axvline(referral["threshold"]["estimate"], color="grey", linestyle=":")
        ax.set_title(name, fontsize="medium")
        ax.legend(fontsize="small", loc="best")
    return figure_png(fig)


def _histogram(ax: Any, label: np.ndarray, prob: np.ndarray) -> None:
    bins = np.linspace(0, 1, 21)
    ax.hist(prob[label == 0], bins, alpha=0.55, color="tab:blue", label="reactive")
    ax.hist(prob[label == 1], bins, alpha=0.55, color="tab:red", label="tumoral")
    ax.set(xlabel="probability of tumoral", ylabel="patients", xlim=(0, 1))


def _sweep(ax: Any, label: np.ndarray, prob: np.ndarray) -> None:
    grid = np.linspace(0, 1, 501)
    above = prob[None, :] >= grid[:, None]  # [G, n]
    ax.plot(grid, above[:, label == 1].mean(1), color="tab:red", label="sensitivity")
    ax.plot(grid, (~above[:, label == 0]).mean(1), color="tab:blue", label="specificity")
    ax.set(xlabel="threshold", ylabel="share", xlim=(0, 1), ylim=(0, 1.05))
