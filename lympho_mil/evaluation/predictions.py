"""Prediction files a clinician (or the challenge) can use, written by a Lightning callback.

``predictions.csv``         ``Id,Predicted``: the challenge submission format, one row a patient
``predictions_detail.csv``  id, probability, predicted, threshold, n_instances, label (-1: unknown),
                            in_sample (the model trained or validated on the patient; empty:
                            its checkpoint does not say)
``attention.csv``           id, file, weight (each crop's share of the decision, sums to 1 per
                            patient) and the crop's own probability, each where the model has
                            it (a clinical-only model: the files alone)
``explanations.md``         with ``explain=True``: one page of per-patient montages
                            (``montages/<id>.png``, see `lympho_mil.evaluation.explain`)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from lympho_mil.evaluation.explain import EXPLANATION_FILE, ExplainError, write_explanations
from lympho_mil.files import atomic_write_files, check_writable

PREDICTION_FILES = ("predictions.csv", "predictions_detail.csv", "attention.csv")


def prediction_tables(records: Sequence[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """The three tables from ``predict_step`` records (one per patient, each id once)."""
    by_id = {r["id"]: r for r in records}  # DDP padding can repeat a patient; keep one
    rows = sorted(by_id.values(), key=lambda r: r["id"])
    detail = pd.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "probability": [r["probability"] for r in rows],
            "predicted": [int(r["probability"] >= r["threshold"]) for r in rows],
            "threshold": [r["threshold"] for r in rows],
            "n_instances": [r["n_instances"] for r in rows],
            "label": [r["label"] for r in rows],
            "in_sample": [r.get("in_sample") for r in rows],
        }
    )
    submission = detail.rename(columns={"id": "Id", "predicted": "Predicted"})[["Id", "Predicted"]]
    crops = []
    for r in rows:
        unknown = [float("nan")] * r["n_instances"]
        weights = r["weights"] or unknown
        crop_prob = r["instance_probability"] or unknown
        crops += [
            (r["id"], f, w, p)
            for f, w, p in zip(r["instance_ids"], weights, crop_prob, strict=True)
        ]
    attention = pd.DataFrame(crops, columns=["id", "file", "weight", "crop_probability"])
    for column in ("weight", "crop_probability"):  # what the model does not give: left out
        if attention[column].isna().all():
            attention = attention.drop(columns=column)
    return {
        "predictions.csv": submission,
        "predictions_detail.csv": detail,
        "attention.csv": attention,
    }


def prediction_files(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The csv text of the three files by file name (see `prediction_tables`)."""
    return {name: table.to_csv(index=False) for name, table in prediction_tables(records).items()}


def write_predictions(
    records: Sequence[dict[str, Any]], output_dir: str | Path, overwrite: bool = False
) -> dict[str, Path]:
    """Write the three files into ``output_dir`` as one (`atomic_write_files`); refuse to
    overwrite by default.

    ``records``: ``predict_step`` records (repeats of a patient are dropped). Returns each
    file's path by file name.
    """
    files = prediction_files(records)
    paths = atomic_write_files({Path(output_dir) / n: text for n, text in files.items()}, overwrite)
    return dict(zip(files, paths, strict=True))


class PredictionWriter(BasePredictionWriter):
    """Writes the prediction files at the end of ``predict``, gathering every rank's patients.

    Args:
        output_dir: folder of the three files.
        overwrite: replace existing files (otherwise predict refuses to start).
        explain: also write a montage of the highest and lowest scored crops per patient
            (weight, or crop probability where the model has one) and a summary page (needs
            a model that reads the crops and a datamodule with ``instance_paths``, e.g. image
            bags).
        explain_top_k: crops per row of a montage.
    """

    def __init__(
        self,
        output_dir: str = "predictions",
        overwrite: bool = False,
        explain: bool = False,
        explain_top_k: int = 8,
    ) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.explain = explain
        self.explain_top_k = explain_top_k

    def check_outputs(self) -> None:
        """Refuse existing output files unless ``overwrite`` (the CLI asks before any crop is
        decoded; ``predict`` asks again at its start)."""
        names = PREDICTION_FILES + ((EXPLANATION_FILE,) if self.explain else ())
        check_writable(
            [self.output_dir / n for n in names],
            self.overwrite,
            hint="--prediction.overwrite true (PredictionWriter(overwrite=True))",
        )

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_outputs()
        if self.explain and not getattr(pl_module, "reads_instances", True):
            raise ExplainError(
                f"explain needs a model that reads the crops; {type(pl_module).__name__} "
                "reads the clinical vector only"
            )
        if self.explain and not hasattr(_datamodule(trainer), "instance_paths"):
            raise ExplainError(
                "explain needs a datamodule of image files with instance_paths(); "
                f"{type(_datamodule(trainer)).__name__} has none"
            )

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        records = [r for batch in _flatten_dataloaders(predictions) for r in batch]
        self.write(trainer, pl_module, gather_records(records))

    def write(self, trainer: Trainer, pl_module: LightningModule, records: list[Any]) -> None:
        """Write the files of these records (every process's; rank 0 writes) and say in one
        line how many patients went where (a fold ensemble's records come here too)."""
        if not trainer.is_global_zero:
            return
        paths = write_predictions(records, self.output_dir, self.overwrite)
        if self.explain:
            write_explanations(
                records,
                _datamodule(trainer).instance_paths,
                self.output_dir,
                self.explain_top_k,
                self.overwrite,
                type(pl_module).__name__,
            )
        patients = {r["id"]: r for r in records}
        seen = sum(bool(r.get("in_sample")) for r in patients.values())
        print(
            f"{len(patients)} patients -> {paths['predictions.csv']} (and "
            f"predictions_detail.csv, attention.csv{', explanations.md' if self.explain else ''})"
            + (f"; {seen} in sample: the model trained or validated on them" if seen else "")
        )


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's ``predict_step`` records (under DDP each predicts its own patients)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def _datamodule(trainer: Trainer) -> Any:
    """``trainer.datamodule``: set by Lightning at run time but missing from its types."""
    return trainer.datamodule  # type: ignore[attr-defined]


def _flatten_dataloaders(predictions: Sequence[Any]) -> list[list[dict[str, Any]]]:
    """Lightning nests predictions per dataloader when there are several."""
    if (
        predictions
        and isinstance(predictions[0], list)
        and predictions[0]
        and isinstance(predictions[0][0], list)
    ):
        return [batch for loader in predictions for batch in loader]
    return list(predictions)
