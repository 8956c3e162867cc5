"""``lympho-mil cv --cv.inner_folds K``: K models a fold, each validated on its own inner
fold, averaged, at a threshold chosen on every training patient once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from lightning import Trainer
from reports import without_timing
from test_cv import FOLDS, REPEATS, configs, cv_args, dlmi_root, load_report, workdir

from lympho_mil.cli import main
from lympho_mil.data import CropSettings, PatientBagDataModule
from lympho_mil.evaluation.cv_plan import FOLD_FILE
from lympho_mil.evaluation.report import cv_output_names
from lympho_mil.evaluation.thresholds import choose_threshold
from lympho_mil.models import TabularMLP

__all__ = ["configs", "dlmi_root", "workdir"]  # test_cv's fixtures, used here by name

MEMBERS = 3


@pytest.fixture(scope="module")
def bagged(workdir: Path, configs: dict[str, Path]) -> Path:
    out = workdir / "bagged"
    main([*cv_args(configs["tabular"], out=out), f"--cv.inner_folds={MEMBERS}"])
    return out


def fold_records(bagged: Path, repeat: int, fold: int) -> list[dict[str, Any]]:
    """The record of each member of a fold, in member order."""
    folders = [bagged / "folds" / f"r{repeat}_f{fold}_m{m}" for m in range(MEMBERS)]
    return [json.loads((f / FOLD_FILE).read_text()) for f in folders]


def test_the_members_validate_on_a_partition_of_the_training_patients(
    bagged: Path, dlmi_root: Path
) -> None:
    labelled = set(pd.read_csv(dlmi_root / "trainset" / "trainset_true.csv")["ID"])
    report = load_report(bagged)
    assert report["inner_folds"] == MEMBERS and len(report["per_fold"]) == FOLDS * REPEATS
    for entry in report["per_fold"]:
        training = labelled - set(entry["test_ids"])
        members = fold_records(bagged, entry["repeat"], entry["fold"])
        vals = [set(m["split"]["val_ids"]) for m in members]
        assert set().union(*vals) == training and sum(map(len, vals)) == len(training)
        for m, val in zip(members, vals, strict=True):
            assert set(m["split"]["train_ids"]) == training - val
            assert m["split"]["test_ids"] == entry["test_ids"]
        assert set(entry["val_ids"]) == training  # the bagged fold: every patient validated


def test_a_fold_predicts_its_members_mean_at_a_threshold_from_every_training_patient(
    bagged: Path,
) -> None:
    oof = pd.read_csv(bagged / "oof_predictions.csv", dtype={"id": str})
    inner = pd.read_csv(bagged / "inner_val_predictions.csv", dtype={"id": str})
    thresholds = set()
    for entry in load_report(bagged)["per_fold"]:
        r, k = entry["repeat"], entry["fold"]
        members = fold_records(bagged, r, k)
        each = [pd.Series({t["id"]: t["probability"] for t in m["test"]}) for m in members]
        rows = oof[(oof["repeat"] == r) & (oof["fold"] == k)].set_index("id")
        mean = pd.concat(each, axis=1).mean(axis=1)
        np.testing.assert_allclose(rows.loc[mean.index, "probability"], mean, atol=1e-6)
        pooled = inner[(inner["repeat"] == r) & (inner["fold"] == k)]
        assert sorted(pooled["id"]) == sorted(entry["val_ids"])  # each patient once
        expected = choose_threshold("inner_val", pooled["probability"], pooled["label"])
        assert entry["threshold"] == pytest.approx(expected, abs=1e-6)
        assert (rows["predicted"] == (rows["probability"] >= entry["threshold"])).all()
        thresholds.add(entry["threshold"])
    assert len(thresholds) > 1


def test_every_member_trains_under_its_own_seed(bagged: Path) -> None:
    seeds = []
    for r in range(REPEATS):
        for k in range(FOLDS):
            for m in range(MEMBERS):
                folder = bagged / "folds" / f"r{r}_f{k}_m{m}"
                seed = yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"]
                assert seed == 3 + m * FOLDS * REPEATS + r * FOLDS + k  # member 0: as unbagged
                seeds.append(seed)
    assert len(set(seeds)) == len(seeds)


def test_the_fold_ensemble_averages_every_member_model(bagged: Path, dlmi_root: Path) -> None:
    """Independent route: reload every member's checkpoint and average all of them (every
    fold has as many members, so the mean of the folds' means is the mean of all)."""
    detail = pd.read_csv(bagged / "predictions_detail.csv").set_index("id")
    datamodule = PatientBagDataModule(
        str(dlmi_root), crops=CropSettings(image_size=32, cache_dir=str(bagged.parent / "cache"))
    )
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    paths = sorted((bagged / "folds").glob("*/model.ckpt"))
    assert len(paths) == FOLDS * REPEATS * MEMBERS
    report = load_report(bagged)
    threshold_of = {f"r{f['repeat']}_f{f['fold']}": f["threshold"] for f in report["per_fold"]}
    probabilities = []
    for path in paths:
        model = TabularMLP.load_from_checkpoint(path)
        fold = path.parent.name.rsplit("_m", 1)[0]
        assert float(model.threshold) == pytest.approx(threshold_of[fold])  # the fold's, pooled
        records = [r for b in trainer.predict(model, datamodule.predict_dataloader()) for r in b]
        probabilities.append(pd.Series({r["id"]: r["probability"] for r in records}))
    mean = pd.concat(probabilities, axis=1).mean(axis=1)
    np.testing.assert_allclose(detail.loc[mean.index, "probability"], mean, atol=1e-6)
    median = float(np.median([f["threshold"] for f in report["per_fold"]]))
    assert report["ensemble"]["threshold"] == pytest.approx(median)


def test_the_report_says_what_a_fold_is(bagged: Path) -> None:
    text = (bagged / "cv_report.md").read_text()
    assert f"Each fold: {MEMBERS} models" in text


def test_a_killed_bagged_run_resumes_to_the_uninterrupted_report(
    bagged: Path, configs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed inside the first fold: its first member kept, the others trained again."""
    out = Path(shutil.copytree(bagged, tmp_path / "killed"))
    for name in cv_output_names(predict=True):
        (out / name).unlink(missing_ok=True)
    for folder in sorted((out / "folds").iterdir())[1:]:
        shutil.rmtree(folder)
    record = out / "folds" / "r0_f0_m0" / FOLD_FILE  # written when a member has trained
    kept = record.stat().st_mtime_ns
    main([*cv_args(configs["tabular"], out=out), f"--cv.inner_folds={MEMBERS}"])
    assert "resuming the cross-validation planned in" in capsys.readouterr().out
    assert record.stat().st_mtime_ns == kept  # not trained again
    assert without_timing(load_report(out)) == without_timing(load_report(bagged))
    for name in ("oof_predictions.csv", "inner_val_predictions.csv"):
        assert (out / name).read_bytes() == (bagged / name).read_bytes()


def test_resuming_with_another_number_of_members_is_refused(
    bagged: Path, configs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(bagged, tmp_path / "killed"))
    (out / "cv_report.json").unlink()
    with pytest.raises(SystemExit) as exc:
        main([*cv_args(configs["tabular"], out=out), "--cv.inner_folds=2"])
    assert exc.value.code == 2
    assert "--cv.inner_folds 3 -> 2" in capsys.readouterr().err


def test_a_member_recorded_for_other_patients_is_trained_again(
    bagged: Path, configs: dict[str, Path], tmp_path: Path
) -> None:
    """A resumed run keeps only what its plan trained: a member whose record names other
    patients (another tool wrote there) is trained again, not averaged in."""
    out = Path(shutil.copytree(bagged, tmp_path / "killed"))
    for name in cv_output_names(predict=True):
        (out / name).unlink(missing_ok=True)
    record_path = out / "folds" / "r0_f0_m0" / FOLD_FILE
    record = json.loads(record_path.read_text())
    planned = record["split"]["train_ids"]
    record["split"]["train_ids"] = sorted({*planned, *record["split"]["test_ids"]})
    record_path.write_text(json.dumps(record))
    main([*cv_args(configs["tabular"], out=out), f"--cv.inner_folds={MEMBERS}"])
    assert json.loads(record_path.read_text())["split"]["train_ids"] == planned
    assert without_timing(load_report(out)) == without_timing(load_report(bagged))
