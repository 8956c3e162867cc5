"""External validation of trained models on a labelled cohort, from their predictions to the
report: each model predicts the cohort's patients into ``<out>/predictions/<name>/`` (its
prediction files and, where the model ranks crops, montages), then `evaluate_predictions`
scores them together into ``<out>``.

How a model predicts is its caller's: a `CohortPredictor` (the command line's runs ``predict``
on a checkpoint; `lympho_mil.cli.evaluate_checkpoints`). This module never imports the
command layer.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from lympho_mil.data.dataset import Bag
from lympho_mil.data.errors import DataError
from lympho_mil.evaluation.bootstrap import DEFAULT_RESAMPLES
from lympho_mil.evaluation.explain import MONTAGE_DIR
from lympho_mil.evaluation.external import (
    EVALUATION_FILES,
    REFERRAL_SENSITIVITIES,
    ModelPredictions,
    check_settings,
    evaluate_predictions,
)
from lympho_mil.files import check_writable

PREDICTIONS_DIR = "predictions"
"""The folder of each model's prediction files inside the output folder."""


class CohortPredictor(Protocol):
    """One trained model that predicts patients of the cohort."""

    def predict(self, patient_ids: Sequence[str], output_dir: Path) -> tuple[pd.DataFrame, str]:
        """Predict ``patient_ids``, writing any files (prediction files, montages) into
        ``output_dir`` (new); return the per-patient table of `ModelPredictions` (``id,
        label, probability, threshold, n_instances``, optional ``montage``, ``in_sample``)
        and where its threshold comes from."""
        ...


def cohort_patients(
    bags: Iterable[Bag], where: str, patient_ids: Sequence[str] | None = None
) -> list[str]:
    """The patients of a cohort to predict for its evaluation: ``patient_ids``, else every
    patient (those without a label are predicted and left out of the figures). `DataError`,
    naming ``where`` (the cohort's folder), when they include no labelled patient, only one
    class, or a patient without crops."""
    by_id = {bag.bag_id: bag for bag in bags}
    ids = list(by_id) if patient_ids is None else list(patient_ids)
    unknown = [pid for pid in ids if pid not in by_id]
    if unknown:
        raise DataError(f"patients {unknown[:10]} are not in the cohort {where}")
    empty = [pid for pid in ids if len(by_id[pid].rows) == 0]
    if empty:
        raise DataError(f"patients {empty[:10]} of the cohort {where} have no crops")
    labels = {by_id[pid].label for pid in ids} - {-1}
    if not labels:
        raise DataError(
            f"the cohort {where} has no labelled patient (every LABEL is -1): an evaluation "
            "needs the true diagnoses; `predict` scores patients without them"
        )
    if len(labels) == 1:
        kind = "tumoral (LABEL 1)" if labels == {1} else "reactive (LABEL 0)"
        raise DataError(
            f"every labelled patient of the cohort {where} is {kind}: the figures need both classes"
        )
    return sorted(ids)


def check_outputs(out_dir: str | Path, overwrite: bool, hint: str = "overwrite=True") -> None:
    """`OutputExistsError` when ``out_dir`` holds an earlier evaluation (its report or its
    ``predictions/``) and not ``overwrite`` (``hint``: how the caller's user asks for it);
    `OutputFolderError` when it cannot be written."""
    out_dir = Path(out_dir)
    earlier = [out_dir / name for name in (*EVALUATION_FILES, PREDICTIONS_DIR)]
    check_writable(earlier, overwrite, hint=hint)


def montage_column(table: pd.DataFrame, output_dir: Path) -> pd.DataFrame:
    """``table`` with a ``montage`` column: each patient's ``montages/<id>.png`` under
    ``output_dir`` where one was written, else empty."""
    montages = [output_dir / MONTAGE_DIR / f"{pid}.png" for pid in table["id"]]
    return table.assign(montage=[str(p) if p.is_file() else "" for p in montages])


def evaluate_cohort(
    predictors: Mapping[str, CohortPredictor],
    patient_ids: Sequence[str],
    out_dir: str | Path,
    *,
    refit_threshold: bool = False,
    referral_sensitivities: Sequence[float] = REFERRAL_SENSITIVITIES,
    n_bootstrap: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    overwrite: bool = False,
    overwrite_hint: str = "overwrite=True",
) -> dict[str, Any]:
    """Each predictor predicts ``patient_ids`` into ``out_dir/predictions/<name>/``, then
    `evaluate_predictions` scores them together (the first is the reference of the paired
    differences) into ``out_dir``; returns the content of ``evaluation.json``.

    Earlier outputs in ``out_dir`` (its report, its ``predictions/``) are refused before any
    work unless ``overwrite`` (``overwrite_hint``: how the caller's user asks for it). Nothing
    is left when anything fails (a refused checkpoint, bad predictions, a full disk): the
    predictions written so far are removed, earlier ones put back, and a folder made for
    the evaluation removed.
    """
    check_settings(list(predictors), referral_sensitivities, n_bootstrap)
    out_dir = Path(out_dir)
    predictions = out_dir / PREDICTIONS_DIR
    check_outputs(out_dir, overwrite, overwrite_hint)
    made = not out_dir.exists()
    kept = out_dir / f".{PREDICTIONS_DIR}.replaced-{os.getpid()}"
    try:
        if predictions.exists():  # overwrite: set aside until the new report is whole
            os.replace(predictions, kept)
        models = []
        for name, predictor in predictors.items():
            table, source = predictor.predict(list(patient_ids), predictions / name)
            models.append(ModelPredictions(name, table, source))
        report = evaluate_predictions(
            models,
            out_dir,
            refit_threshold=refit_threshold,
            referral_sensitivities=referral_sensitivities,
            n_bootstrap=n_bootstrap,
            seed=seed,
            overwrite=overwrite,
        )
    except BaseException:
        shutil.rmtree(predictions, ignore_errors=True)
        if kept.exists():
            os.replace(kept, predictions)
        if made:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    shutil.rmtree(kept, ignore_errors=True)
    return report
