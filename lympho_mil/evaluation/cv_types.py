"""The objects of a cross-validation: its settings, the patients of each fold, what a fold
runner builds and what a fold run and a whole cross-validation produce.

Apart from `lympho_mil.evaluation.cv` (which runs them) so that the report and the resumption
of a killed run (`lympho_mil.evaluation.report`, `lympho_mil.evaluation.cv_plan`), which
`cv` calls, read them without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import pandas as pd
from lightning import Trainer

from lympho_mil.data.datamodule import BagDataModule
from lympho_mil.evaluation.bootstrap import DEFAULT_RESAMPLES
from lympho_mil.evaluation.thresholds import THRESHOLD_POLICIES, ThresholdPolicy
from lympho_mil.models.base import BagClassifier

OOF_COLUMNS = ("repeat", "fold", "id", "label", "probability", "predicted", "threshold")


@dataclass(frozen=True)
class CVSettings:
    """How the cross-validation runs (shared by every compared config)."""

    folds: int = 5
    repeats: int = 1
    seed: int = 0
    threshold_policy: ThresholdPolicy = "inner_val"
    inner_val_fraction: float = 0.2
    n_bootstrap: int = DEFAULT_RESAMPLES
    predict: bool = False
    verbose: bool = True
    patients: Sequence[str] | None = None  # a subset of the labelled patients (None: all)
    inner_folds: int | None = None  # K: a bagged ensemble of K models a fold (`FoldSplit`)

    def __post_init__(self) -> None:
        if self.patients is not None:
            object.__setattr__(self, "patients", tuple(self.patients))
        if self.threshold_policy not in THRESHOLD_POLICIES:
            raise ValueError(
                f"threshold_policy must be one of {THRESHOLD_POLICIES}, "
                f"got {self.threshold_policy!r}"
            )
        if self.repeats < 1 or self.n_bootstrap < 1:
            raise ValueError("repeats and n_bootstrap must be >= 1")
        if self.folds < 2 or not 0.0 < self.inner_val_fraction < 1.0:
            raise ValueError(
                f"folds must be >= 2 and inner_val_fraction in (0, 1), got {self.folds} and "
                f"{self.inner_val_fraction}"
            )
        if self.inner_folds is not None and self.inner_folds < 2:
            raise ValueError(f"inner_folds must be None or >= 2, got {self.inner_folds}")


@dataclass(frozen=True)
class FoldSplit:
    """Patients of one outer fold: train and inner validation (disjoint), and the test fold.

    ``member``: None for the fold's one model; with ``CVSettings.inner_folds`` K, the fold has
    K splits, member j validated on the j-th of K stratified inner folds of the fold's
    training patients and trained on the others (`lympho_mil.evaluation.ensemble.bag_fold`
    averages them).
    """

    repeat: int
    fold: int
    train_ids: list[str]
    val_ids: list[str]
    test_ids: list[str]
    member: int | None = None


@dataclass(frozen=True)
class FoldSetup:
    """What a runner builds one fold run for.

    split: the fold's patients (train on ``train_ids``, validate on ``val_ids``, test on
        ``test_ids``: the datamodule's explicit id lists).
    seed: seed everything with it before building (each fold its own).
    directory: the fold's folder, for its logs and checkpoints.
    predict_ids: the patients its ``predict`` split holds (None: the data's own, as
        configured).
    """

    split: FoldSplit
    seed: int
    directory: Path
    predict_ids: list[str] | None


class FoldObjects(NamedTuple):
    """A fold run as built by a `FoldRunner`: the trainer fits the model on the datamodule."""

    trainer: Trainer
    model: BagClassifier
    datamodule: BagDataModule


class FoldRunner(Protocol):
    """What cross-validation needs from its caller to train one fold.

    `ModuleRunner` builds folds from Python callables; ``lympho_mil.cli.cv.ConfigRunner``
    from a ``fit`` config, as the ``lympho-mil cv`` command does.
    """

    def data(self) -> BagDataModule:
        """The datamodule as configured (its bags and ``predict`` split are read; nothing
        is trained)."""
        ...

    def build(self, setup: FoldSetup) -> FoldObjects:
        """A fresh trainer, model and datamodule for one fold, seeded with ``setup.seed``,
        whose trainer keeps its best checkpoint on the validation patients
        (``trainer.checkpoint_callback``) and writes into ``setup.directory``."""
        ...

    def record(self) -> dict[str, Any]:
        """What the report records about this configuration (entries of
        ``cv_report.json``, e.g. ``{"config": ..., "overrides": ...}``). A runner may also
        have ``resolved_config()``, every setting its folds depend on as dotted keys (the
        command line's: the resolved ``fit`` config); without it, a resumed cross-validation
        compares ``record()`` with its plan's (`lympho_mil.evaluation.cv_plan.fingerprint`)."""
        ...


@dataclass
class FoldRun:
    """What one fold run produced: its threshold and ``predict_step`` records per split."""

    split: FoldSplit
    threshold: float
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    unlabelled: list[dict[str, Any]] | None
    seconds: float


@dataclass
class CVResult:
    """Cross-validation of one config.

    name: the configuration's name (its folder under `run_comparison`'s ``out_dir``).
    report: the content of ``cv_report.json``.
    oof: out-of-fold predictions, columns `OOF_COLUMNS` (each patient once a repeat).
    inner_val: the inner-validation predictions each fold's threshold was chosen on.
    ensemble: fold-ensemble records of the unlabelled patients (``predict=True``), else None;
        `prediction_tables` turns them into tables.
    out_dir: where the files were written (None: nothing written).
    runs: each fold run (split, threshold, ``predict_step`` records, seconds).
    """

    name: str
    report: dict[str, Any]
    oof: pd.DataFrame
    inner_val: pd.DataFrame
    ensemble: list[dict[str, Any]] | None = None
    out_dir: Path | None = None
    runs: list[FoldRun] = field(default_factory=list, repr=False)


@dataclass
class Comparison:
    """Several configs on identical splits: each one's result and the paired table."""

    results: list[CVResult]
    table: dict[str, Any]
