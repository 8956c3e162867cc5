"""Repeated, stratified, patient-level cross-validation, driven through a fold runner.

Repeat ``r`` splits the labelled patients into K stratified folds (seed ``seed + r``). For
each outer fold, an inner validation split is carved from the other patients only. The fold
run trains on the inner training patients (the clinical standardisation is fitted on them),
keeps the checkpoint that is best on the inner validation patients (its trainer's
``ModelCheckpoint``), chooses its decision threshold there too, then predicts the outer fold
once. Several runners run on identical splits and get a paired comparison.

What trains one fold comes from the caller, as a `FoldRunner`: `ModuleRunner` builds it
from Python callables; the command line's runner (``lympho_mil.cli.cv``) from a ``fit``
config, so ``lympho-mil cv`` accepts any config that ``fit`` does.

With an output folder, a killed cross-validation run again with the same arguments resumes:
it keeps the folds that finished and writes the report an uninterrupted run writes
(`lympho_mil.evaluation.cv_plan`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from lympho_mil.data.datamodule import BagDataModule
from lympho_mil.data.errors import DataError
from lympho_mil.data.settings import SplitSettings
from lympho_mil.data.splits import holdout_split, stratified_folds
from lympho_mil.evaluation.bootstrap import DEFAULT_RESAMPLES
from lympho_mil.evaluation.cv_plan import (
    BAG_REPORT,
    PLAN_FILE,
    fingerprint,
    finished_fold,
    make_plan,
    save_fold,
    start_or_resume,
    unfinished_plan,
)
from lympho_mil.evaluation.cv_types import (
    OOF_COLUMNS,
    Comparison,
    CVResult,
    CVSettings,
    FoldObjects,
    FoldRun,
    FoldRunner,
    FoldSetup,
    FoldSplit,
)
from lympho_mil.evaluation.ensemble import bag_fold, ensemble_records
from lympho_mil.evaluation.report import (
    COMPARISON_FILES,
    comparison_table,
    cv_output_names,
    cv_report,
    write_comparison,
    write_cv_outputs,
)
from lympho_mil.evaluation.thresholds import (
    ThresholdPolicy,
    choose_on_validation,
)
from lympho_mil.files import check_writable, naming
from lympho_mil.models.base import BagClassifier
from lympho_mil.models.checkpoint import store_threshold

QUIET_WARNINGS = (".*LeafSpec.* is deprecated",)  # Lightning's own use of torch.utils._pytree
QUIET_TRAINER: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}
"""Trainer defaults of a fold run (one line a fold is printed instead)."""


@dataclass
class ModuleRunner:
    """Folds built from Python callables, without configs or the command line.

    Args:
        make_data: returns a datamodule; called with no argument for the data as configured,
            and with ``split`` (a `lympho_mil.data.SplitSettings` of the fold's
            ``train_ids``, ``val_ids`` and ``test_ids``) and, where the fold names them,
            ``predict_ids``, e.g. ``functools.partial(PatientBagDataModule, root,
            crops=CropSettings(image_size=64))``.
        make_model: the model for a datamodule, e.g. ``lambda dm: TabularMLP(
            tabular_dim=dm.tabular_dim, tabular_stats=dm.tabular_stats)``.
        trainer: ``Trainer`` arguments (``max_epochs``, ``accelerator``, ...); the runner
            sets the logger, the checkpoint callback and the folder.
        monitor, mode: what the best checkpoint is chosen by on the validation patients.
    """

    make_data: Callable[..., BagDataModule]
    make_model: Callable[[BagDataModule], BagClassifier]
    trainer: dict[str, Any] = field(default_factory=dict)
    monitor: str = "val_balanced_accuracy"
    mode: str = "max"

    def data(self) -> BagDataModule:
        return self.make_data()

    @cached_property
    def teacher_confidence(self) -> float | None:
        """The co-training setting of the data as configured, kept in every fold's split."""
        return self.make_data().split.teacher_confidence

    def build(self, setup: FoldSetup) -> FoldObjects:
        seed_everything(setup.seed, workers=True, verbose=False)
        fold = setup.split
        ids = SplitSettings(
            train_ids=fold.train_ids,
            val_ids=fold.val_ids,
            test_ids=fold.test_ids,
            teacher_confidence=self.teacher_confidence,
        )
        predict = {} if setup.predict_ids is None else {"predict_ids": setup.predict_ids}
        datamodule = self.make_data(split=ids, **predict)
        model = self.make_model(datamodule)
        checkpoint = ModelCheckpoint(
            dirpath=setup.directory / "checkpoints", monitor=self.monitor, mode=self.mode
        )
        trainer = Trainer(
            **{**QUIET_TRAINER, **self.trainer},
            default_root_dir=setup.directory,
            logger=CSVLogger(setup.directory, name="", version=""),
            callbacks=[checkpoint],
        )
        return FoldObjects(trainer, model, datamodule)

    def record(self) -> dict[str, Any]:
        return {"config": {"source": "python", "trainer": self.trainer}}


def cv_splits(
    ids: Sequence[str],
    labels: Sequence[int],
    folds: int,
    repeats: int,
    seed: int,
    inner_val_fraction: float,
    inner_folds: int | None = None,
) -> list[FoldSplit]:
    """Every (repeat, fold): stratified outer folds and an inner validation split carved from
    the outer training patients only; with ``inner_folds`` K, K splits a fold instead, whose
    validation patients are K stratified folds of the outer training patients (`FoldSplit`'s
    ``member``).

    ``ids`` and ``labels`` (0/1) are the labelled patients; the other arguments are those of
    `run_cross_validation`. Raises `DataError` when the patients cannot be split so.
    """
    label_of = dict(zip(ids, labels, strict=True))
    splits = []
    try:
        for repeat in range(repeats):
            outer = stratified_folds(ids, labels, folds, seed + repeat)
            for fold, test_ids in enumerate(outer):
                rest = sorted(i for k, part in enumerate(outer) if k != fold for i in part)
                rest_labels = [label_of[i] for i in rest]
                if inner_folds is None:
                    train_ids, val_ids = holdout_split(
                        rest, rest_labels, inner_val_fraction, seed + repeat
                    )
                    splits.append(FoldSplit(repeat, fold, train_ids, val_ids, list(test_ids)))
                    continue
                inner = stratified_folds(rest, rest_labels, inner_folds, seed + repeat)
                for member, val_ids in enumerate(inner):
                    train_ids = sorted(set(rest) - set(val_ids))
                    splits.append(
                        FoldSplit(repeat, fold, train_ids, val_ids, list(test_ids), member)
                    )
    except ValueError as exc:
        inner_split = (
            f"{inner_folds} inner folds"
            if inner_folds is not None
            else f"an inner validation fraction of {inner_val_fraction}"
        )
        raise DataError(
            f"cannot split {len(ids)} labelled patients into {folds} folds with {inner_split}: "
            f"{exc}"
        ) from exc
    return splits


def run_cross_validation(
    runner: FoldRunner,
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    out_dir: str | Path | None = None,
    threshold_policy: ThresholdPolicy = "inner_val",
    inner_val_fraction: float = 0.2,
    predict: bool = False,
    overwrite: bool = False,
    n_bootstrap: int = DEFAULT_RESAMPLES,
    verbose: bool = True,
    patients: Sequence[str] | None = None,
    name: str = "model",
    inner_folds: int | None = None,
) -> CVResult:
    """Repeated stratified patient-level k-fold cross-validation of what ``runner`` trains.

    Args:
        runner: builds each fold's trainer, model and datamodule (`FoldRunner`).
        folds, repeats, seed: K outer folds, R repeats; repeat r shuffles with ``seed + r``.
        out_dir: where to write the report, predictions, plots and fold models (None: keep
            everything in memory).
        threshold_policy: "inner_val" (maximise balanced accuracy on the inner validation
            patients) or "fixed" (the model's threshold setting, 0.5 by default).
        inner_val_fraction: share of each outer training set held out as inner validation.
        predict: also average the fold models on the unlabelled patients (fold ensemble).
        overwrite: replace an existing report in ``out_dir``.
        n_bootstrap: resamples of the patient-level bootstrap.
        verbose: print one line per fold.
        patients: cross-validate these labelled patients only (default: all of them), e.g.
            the training patients of an outer fold in a nested cross-validation.
        name: the name the report and the fold lines give it.
        inner_folds: None (one model a fold, validated on ``inner_val_fraction`` of its
            training patients) or K >= 2: K models a fold, model j validated on the j-th of K
            stratified inner folds and trained on the rest, their probabilities averaged and
            the threshold chosen on their pooled validation predictions (every training
            patient once; `lympho_mil.evaluation.ensemble.bag_fold`). K times the training;
            ``inner_val_fraction`` is then unused.
    """
    settings = CVSettings(
        folds,
        repeats,
        seed,
        threshold_policy,
        inner_val_fraction,
        n_bootstrap,
        predict,
        verbose,
        patients,
        inner_folds,
    )
    return _run({name: _checked(runner)}, settings, out_dir, overwrite, compare=False).results[0]


def run_comparison(
    runners: Mapping[str, FoldRunner],
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    out_dir: str | Path | None = None,
    threshold_policy: ThresholdPolicy = "inner_val",
    inner_val_fraction: float = 0.2,
    predict: bool = False,
    overwrite: bool = False,
    n_bootstrap: int = DEFAULT_RESAMPLES,
    verbose: bool = True,
    patients: Sequence[str] | None = None,
    inner_folds: int | None = None,
) -> Comparison:
    """Cross-validate several runners on identical splits; compare each with the first.

    Each one's outputs go to ``out_dir/<name>/``, the paired table to
    ``out_dir/comparison.json`` and ``comparison.md``. Other arguments as
    `run_cross_validation`.
    """
    if len(runners) < 2:
        raise ValueError("a comparison needs at least two configs")
    settings = CVSettings(
        folds,
        repeats,
        seed,
        threshold_policy,
        inner_val_fraction,
        n_bootstrap,
        predict,
        verbose,
        patients,
        inner_folds,
    )
    checked = {name: _checked(runner) for name, runner in runners.items()}
    return _run(checked, settings, out_dir, overwrite, compare=True)


def _checked(runner: FoldRunner) -> FoldRunner:
    if isinstance(runner, (str, Path, dict)):
        raise TypeError(
            "run_cross_validation takes a FoldRunner; for a config file or dict use "
            "lympho_mil.cross_validate (or lympho_mil.cli.cv.ConfigRunner)"
        )
    return runner


def _run(
    runners: dict[str, FoldRunner],
    settings: CVSettings,
    out_dir: str | Path | None,
    overwrite: bool,
    compare: bool,
) -> Comparison:
    names = list(runners)
    root = Path(out_dir) if out_dir is not None else None
    dirs = {n: (root / n if compare else root) if root else None for n in names}
    resuming = unfinished_plan(root, overwrite)  # a killed run's plan: resume it
    stale = _claim_outputs(root, list(dirs.values()), compare, overwrite, resuming) if root else []
    with tempfile.TemporaryDirectory(prefix="lympho-cv-") as scratch:
        seen = [labelled_patients(r, settings.predict) for r in runners.values()]
        patients = [(ids, labels) for ids, labels, _ in seen]
        for name, other in zip(names[1:], patients[1:], strict=True):
            if other != patients[0]:
                raise DataError(f"config {name} sees other labelled patients than {names[0]}")
        ids, labels = _restrict(*patients[0], settings.patients)
        splits = cv_splits(
            ids,
            labels,
            settings.folds,
            settings.repeats,
            settings.seed,
            settings.inner_val_fraction,
            settings.inner_folds,
        )
        remove_outputs(stale)  # only now: configs and splits are sound, the run starts
        if root is not None:
            prints = {n: f for n, (_, _, f) in zip(names, seen, strict=True)}
            start_or_resume(root, make_plan(settings, prints, splits), resuming, settings.verbose)
        results = []
        for name, runner in runners.items():
            fold_root = (dirs[name] or Path(scratch) / name) / "folds"
            runs = run_folds(name, runner, splits, settings, fold_root, dirs[name])
            results.append(_collect(name, runner, runs, settings, len(ids)))
    for result in results:
        out_dir = dirs[result.name]
        if out_dir is not None:
            result.out_dir = out_dir
            write_cv_outputs(result, out_dir, settings.n_bootstrap, settings.seed)
    table = comparison_table(results, settings.n_bootstrap, settings.seed) if compare else {}
    if compare and root is not None:
        write_comparison(table, root)
    return Comparison(results, table)


def _claim_outputs(
    root: Path, dirs: list[Path | None], compare: bool, overwrite: bool, resuming: bool
) -> list[Path]:
    """Refuse to start when an earlier run's outputs exist (unless ``overwrite``); return them,
    every file a cross-validation may write and the old fold models, for `remove_outputs`. Both
    layouts count (one config: files in ``root``; a comparison: ``root/<name>/`` folders and
    the comparison files), so a run of one layout leaves nothing of the other behind. An
    unfinished run resumed claims nothing: its plan and fold runs are kept."""
    if resuming:
        check_writable([root / PLAN_FILE], overwrite=True)  # the folder, still writable?
        return []
    homes = {*(d for d in dirs if d is not None), root}
    paths = [d / n for d in homes for n in cv_output_names(predict=True)]
    paths += [d / "folds" for d in homes] + [root / PLAN_FILE, root / BAG_REPORT]
    paths += [root / n for n in COMPARISON_FILES]
    paths += [root / name for name in _compared_names(root)]  # an earlier comparison's
    paths = list(dict.fromkeys(paths))
    if compare:  # its own per-config folders are claimed file by file above
        paths = [p for p in paths if p not in dirs]
    check_writable(paths, overwrite, hint="cv --cv.overwrite true, or overwrite=True")
    return [p for p in paths if p.exists()]


def _compared_names(root: Path) -> list[str]:
    """The config folders that an earlier comparison in ``root`` wrote (its comparison.json
    names them), or none."""
    try:
        table = json.loads((root / COMPARISON_FILES[0]).read_text())
        names = [str(table["reference"]), *map(str, table["difference"])]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [n for n in names if Path(n).name == n and n not in (".", "..")]  # plain folders


def remove_outputs(paths: Sequence[Path]) -> None:
    """Delete an earlier run's outputs: none of them may outlive the models they describe."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def labelled_patients(
    runner: FoldRunner, predict: bool
) -> tuple[list[str], list[int], dict[str, Any]]:
    """The labelled patients of the runner's data (sorted) and their labels; with
    ``predict``, those named to predict (``predict_ids``) are left out: no fold model may
    train on a patient it predicts. Third: the runner's `fingerprint`, for the plan."""
    with _quiet_lightning():
        datamodule = runner.data()
    bags = sorted(datamodule.bags.values(), key=lambda b: b.bag_id)
    to_predict = set(datamodule.split_ids["predict"]) if predict else set()
    labelled = [b for b in bags if b.label in (0, 1) and b.bag_id not in to_predict]
    if not labelled:
        raise DataError(
            f"the data holds no labelled patient (LABEL 0 or 1) to cross-validate, only "
            f"{len(bags)} without a label; cross-validation needs the labelled ones"
        )
    if predict and not to_predict:
        raise DataError(
            "predict (cv --cv.predict): the data has no unlabelled patients to predict; name "
            "patients to predict with --data.predict_ids '[P26, P27]' (left out of the folds)"
        )
    ids, labels = [b.bag_id for b in labelled], [int(b.label) for b in labelled]
    return ids, labels, fingerprint(runner, datamodule)


def _restrict(
    ids: list[str], labels: list[int], keep: Sequence[str] | None
) -> tuple[list[str], list[int]]:
    """The labelled patients among ``keep`` (all when None); unknown ids are an error."""
    if keep is None:
        return ids, labels
    unknown = sorted(set(keep) - set(ids))
    if unknown:
        raise DataError(f"patients not among the labelled patients of the data: {unknown[:5]}")
    wanted = set(keep)
    pairs = [(i, y) for i, y in zip(ids, labels, strict=True) if i in wanted]
    return [i for i, _ in pairs], [y for _, y in pairs]


def _run_fold(
    name: str,
    runner: FoldRunner,
    split: FoldSplit,
    settings: CVSettings,
    fold_root: Path,
    out_dir: Path | None,
) -> FoldRun:
    """Train on the inner training patients, choose checkpoint and threshold on the inner
    validation patients, then predict the test fold (and the unlabelled patients)."""
    start = time.perf_counter()
    fold_dir = _fold_dir(fold_root, split)
    # member j > 0 after every fold's member j-1: seeds depend on the number of repeats
    member_offset = settings.repeats * settings.folds * (split.member or 0)
    setup = FoldSetup(
        split,
        seed=settings.seed + member_offset + split.repeat * settings.folds + split.fold,
        directory=fold_dir,
        # Every trainer.predict sets the datamodule up for "predict"; without the ensemble,
        # point that split at the test fold (a bag's member, which tests none: its validation
        # patients) so data without unlabelled patients works.
        predict_ids=None if settings.predict else (split.test_ids or split.val_ids),
    )
    with _quiet_lightning():
        trainer, model, datamodule = runner.build(setup)
        datamodule.setup()  # every split over one instance store (the trainer: one per stage)
        trainer.fit(model, datamodule=datamodule)
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        if not best:
            member = "" if split.member is None else f" member {split.member}"
            raise DataError(
                f"{name} repeat {split.repeat} fold {split.fold}{member}: no checkpoint was "
                "kept on the inner validation patients; cv needs validation to run (check "
                "trainer.limit_val_batches and check_val_every_n_epoch)"
            )
        val = _predict(trainer, model, datamodule.val_dataloader(), ckpt_path=best)
        chosen, model.notes = choose_on_validation(
            settings.threshold_policy, val, model.threshold_setting
        )
        model.threshold.fill_(chosen)
        threshold = float(model.threshold)  # as the model (float32) applies it
        test = _predict(trainer, model, datamodule.test_dataloader()) if split.test_ids else []
        unlabelled = (
            _predict(trainer, model, datamodule.predict_dataloader()) if settings.predict else None
        )
        if out_dir is not None:
            try:
                trainer.save_checkpoint(fold_dir / "model.ckpt", weights_only=True)
            except OSError as exc:  # a full disk names no file
                raise naming(exc, fold_dir / "model.ckpt") from exc
        shutil.rmtree(fold_dir / "checkpoints", ignore_errors=True)
    run = FoldRun(split, threshold, val, test, unlabelled, time.perf_counter() - start)
    if out_dir is not None:
        save_fold(fold_dir, run)  # what a resumed run keeps
    return run


def run_folds(
    name: str,
    runner: FoldRunner,
    splits: Sequence[FoldSplit],
    settings: CVSettings,
    fold_root: Path,
    out_dir: Path | None,
) -> list[FoldRun]:
    """Every fold of one config, in order: kept from a killed run where it finished, else
    trained; with ``verbose``, one line a fold (a member, with ``inner_folds``) with the time
    so far and an estimate of the rest (from the folds trained in this run). With
    ``inner_folds``, each fold's members averaged (`bag_fold`), and the fold's threshold
    written into each member's saved model, so that the models of the folder predict as the
    report says."""
    runs: list[FoldRun] = []
    started, trained = time.perf_counter(), 0
    for split in splits:
        run = finished_fold(_fold_dir(fold_root, split))
        if run is not None and run.split != split:  # not this plan's (another tool's): again
            shutil.rmtree(_fold_dir(fold_root, split))
            run = None
        kept = run is not None
        if run is None:
            run = _run_fold(name, runner, split, settings, fold_root, out_dir)
            trained += 1
        runs.append(run)
        if settings.verbose:
            elapsed, left = time.perf_counter() - started, len(splits) - len(runs)
            when = "kept from the earlier run" if kept else f"{_duration(elapsed)} so far"
            if trained and left:
                when += f", about {_duration(elapsed / trained * left)} left"
            _print_fold(name, run, settings, when)
    if settings.inner_folds is None:
        return runs
    members: dict[tuple[int, int], list[FoldRun]] = {}
    for run in runs:
        members.setdefault((run.split.repeat, run.split.fold), []).append(run)
    bags = []
    for parts in members.values():
        bag, notes = bag_fold(parts, settings.threshold_policy)
        if out_dir is not None:  # the choice; each member keeps its own validation scores
            chosen = {"threshold": notes["threshold"], "validation": {}}
            for part in parts:
                path = _fold_dir(fold_root, part.split) / "model.ckpt"
                store_threshold(path, bag.threshold, chosen)
        bags.append(bag)
    return bags


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s`` or ``1 h 2 min``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _fold_dir(fold_root: Path, split: FoldSplit) -> Path:
    member = "" if split.member is None else f"_m{split.member}"
    return fold_root / f"r{split.repeat}_f{split.fold}{member}"


def _predict(trainer: Any, model: Any, loader: Any, ckpt_path: str | None = None) -> list[dict]:
    """``predict_step`` records of every patient of ``loader``."""
    batches = trainer.predict(model, dataloaders=loader, ckpt_path=ckpt_path)
    return [record for batch in batches for record in batch]


def _print_fold(name: str, run: FoldRun, settings: CVSettings, when: str) -> None:
    s = run.split
    member = "" if s.member is None else f" member {s.member + 1}/{settings.inner_folds}"
    scored = f"threshold {run.threshold:.3f}"
    if run.test:  # a bag fitted on every patient (`lympho_mil.evaluation.bag`) tests none
        labels = [r["label"] for r in run.test]
        probs = [r["probability"] for r in run.test]
        predicted = [int(p >= run.threshold) for p in probs]
        scored += (
            f"; test balanced accuracy {balanced_accuracy_score(labels, predicted):.3f}, "
            f"AUROC {roc_auc_score(labels, probs):.3f}"
        )
    where = (  # as folds/r<R>_f<F>[_m<M>]; a bag's member (no test): its number alone
        f"repeat {s.repeat} fold {s.fold}{member} "
        f"({s.repeat * settings.folds + s.fold + 1}/{settings.repeats * settings.folds})"
        if s.test_ids
        else member.strip()
    )
    tested = f", {len(s.test_ids)} test" if s.test_ids else ""
    print(
        f"[{name}] {where}: {len(s.train_ids)} train, {len(s.val_ids)} val{tested} patients; "
        f"{scored} ({run.seconds:.1f} s; {when})",
        flush=True,
    )


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info lines and possible-mistake warnings during fold runs."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PossibleUserWarning)
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _prediction_rows(run: FoldRun, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "repeat": run.split.repeat,
            "fold": run.split.fold,
            "id": r["id"],
            "label": r["label"],
            "probability": r["probability"],
            "predicted": int(r["probability"] >= run.threshold),
            "threshold": run.threshold,
        }
        for r in sorted(records, key=lambda r: r["id"])
    ]


def _collect(
    name: str,
    runner: FoldRunner,
    runs: list[FoldRun],
    settings: CVSettings,
    n_patients: int,
) -> CVResult:
    oof = pd.DataFrame([row for run in runs for row in _prediction_rows(run, run.test)])
    inner = pd.DataFrame([row for run in runs for row in _prediction_rows(run, run.val)])
    oof = oof.loc[:, list(OOF_COLUMNS)].sort_values(["repeat", "id"], ignore_index=True)
    records, ensemble_info = None, None
    if settings.predict:
        records, ensemble_info = ensemble_records(
            [run.threshold for run in runs], [run.unlabelled or [] for run in runs]
        )
    report = cv_report(
        name=name,
        record=runner.record(),
        settings=settings,
        n_patients=n_patients,
        runs=runs,
        oof=oof,
        ensemble=ensemble_info,
    )
    return CVResult(name, report, oof, inner, records, runs=runs)
