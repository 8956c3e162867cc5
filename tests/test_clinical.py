"""Clinical table: both editions, both DOB formats, sex, log count, train-only standardisation."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lympho_mil.data import PatientBagDataModule, read_dlmi
from lympho_mil.data.clinical import (
    FEATURE_NAMES,
    clinical_features,
    fit_standardization,
    parse_dob,
    read_clinical_csv,
    validate_clinical,
)

HEADER = "ID,LABEL,GENDER,DOB,LYMPH_COUNT\n"


def clinical_frame(tmp_path: Path, rows: list[str], reference_date: str = "2020-01-01"):
    path = tmp_path / "clinical.csv"
    path.write_text(HEADER + "".join(f"{r}\n" for r in rows))
    return validate_clinical(read_clinical_csv(path), reference_date)


def test_both_dob_formats() -> None:
    assert parse_dob("11/3/1933", "P1") == date(1933, 11, 3)
    assert parse_dob("27-08-1951", "P1") == date(1951, 8, 27)
    assert parse_dob(" 01/02/1960 ", "P1") == date(1960, 1, 2)


def test_age_at_configurable_reference_date(tmp_path: Path) -> None:
    rows = ["P1,1,M,1/1/1950,10", "P2,0,F,01-01-1970,5"]
    default = clinical_frame(tmp_path, rows)
    assert default.loc["P1", "age"] == pytest.approx(70.0, abs=0.01)
    assert default.loc["P2", "age"] == pytest.approx(50.0, abs=0.01)
    later = clinical_frame(tmp_path, rows, reference_date="2030-01-01")
    np.testing.assert_allclose(later["age"] - default["age"], 10.0, atol=0.01)


def test_sex_any_case_and_log_count(tmp_path: Path) -> None:
    frame = clinical_frame(
        tmp_path, ["P1,1,M,1/1/1950,10", "P2,0,f,1/1/1950,5.5", "P3,-1,m,1/1/1950,250"]
    )
    assert frame["sex_male"].tolist() == [1.0, 0.0, 1.0]
    assert frame["label"].tolist() == [1, 0, -1]
    np.testing.assert_allclose(frame["log_lymph_count"], np.log([10.0, 5.5, 250.0]))
    feats = clinical_features(frame, ["P3", "P1"])
    assert feats.dtype == np.float32 and feats.shape == (2, len(FEATURE_NAMES))
    np.testing.assert_allclose(feats[0], [frame.loc["P3", "age"], np.log(250.0), 1.0], rtol=1e-6)


def test_2024_edition_reads_both_split_csvs(synthetic_dlmi: Path) -> None:
    train = pd.read_csv(synthetic_dlmi / "trainset" / "trainset_true.csv")
    test = pd.read_csv(synthetic_dlmi / "testset" / "testset_data.csv")
    frame, records = read_dlmi(synthetic_dlmi)
    assert list(frame.index) == [*train["ID"], *test["ID"]]
    assert frame.loc[list(train["ID"]), "label"].tolist() == train["LABEL"].tolist()
    assert set(frame.loc[list(test["ID"]), "label"]) == {-1}
    np.testing.assert_allclose(frame.loc[list(train["ID"]), "lymph_count"], train["LYMPH_COUNT"])
    assert [r.patient_id for r in records] == list(frame.index)


def test_2021_edition_reads_annotation_with_unnamed_index(dlmi_root: Path) -> None:
    frame_2024, _ = read_dlmi(dlmi_root)
    (dlmi_root / "trainset" / "trainset_true.csv").unlink()
    (dlmi_root / "testset" / "testset_data.csv").unlink()
    assert (dlmi_root / "clinical_annotation.csv").read_text().startswith(",ID,")
    frame_2021, records = read_dlmi(dlmi_root)
    pd.testing.assert_frame_equal(frame_2021.sort_index(), frame_2024.sort_index())
    assert {r.folder.parent.name for r in records} == {"trainset", "testset"}


def test_fit_standardization_plain_floats() -> None:
    feats = np.array([[60.0, 1.0, 1.0], [80.0, 3.0, 1.0]], dtype=np.float32)
    stats = fit_standardization(feats)
    assert stats == {"mean": [70.0, 2.0, 1.0], "scale": [10.0, 1.0, 1.0]}  # constant -> 1
    assert all(type(v) is float for v in stats["mean"] + stats["scale"])


def _set_value(root: Path, pid: str, column: str, value: str) -> None:
    csv = root / "trainset" / "trainset_true.csv"
    table = pd.read_csv(csv, dtype=str)
    table.loc[table["ID"] == pid, column] = value
    table.to_csv(csv, index=False)


def test_standardisation_fitted_on_training_patients_only(dlmi_root: Path) -> None:
    kwargs: dict[str, Any] = {
        "crops": {"image_size": 16},
        "split": {"val_fraction": 0.3},
        "seed": 1,
    }
    before = PatientBagDataModule(str(dlmi_root), **kwargs)
    stats = before.tabular_stats
    assert all(type(v) is float for v in stats["mean"] + stats["scale"])
    train = np.stack([before.bags[i].tabular for i in before.split_ids["train"]])
    np.testing.assert_allclose(stats["mean"], train.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["scale"], train.std(axis=0), rtol=1e-5)

    val_patient = before.split_ids["val"][0]
    _set_value(dlmi_root, val_patient, "LYMPH_COUNT", "9999")
    _set_value(dlmi_root, val_patient, "DOB", "1/1/1900")
    after = PatientBagDataModule(str(dlmi_root), **kwargs)
    assert after.split_ids == before.split_ids
    assert after.tabular_stats == stats

    train_patient = before.split_ids["train"][0]
    _set_value(dlmi_root, train_patient, "LYMPH_COUNT", "9999")
    assert PatientBagDataModule(str(dlmi_root), **kwargs).tabular_stats != stats
