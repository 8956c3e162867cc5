"""The DLMI folder reader: one record per csv row, its folder, its sorted image files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from lympho_mil.data import DataError, read_dlmi
from lympho_mil.data.dlmi import check_patient_id


def test_records_follow_the_csv_and_the_folders(synthetic_dlmi: Path) -> None:
    truth = pd.read_csv(synthetic_dlmi / "ground_truth.csv")
    frame, records = read_dlmi(synthetic_dlmi)
    assert [r.patient_id for r in records] == list(frame.index)
    for record in records:
        expected = truth[truth["ID"] == record.patient_id]
        split = expected["split"].iloc[0]
        assert record.folder == synthetic_dlmi / split / record.patient_id
        assert record.label == (-1 if split == "testset" else expected["label"].iloc[0])
        assert list(record.files) == sorted(expected["file"])
        assert all(path.is_file() for path in record.paths)


def test_only_image_files_count(dlmi_root: Path) -> None:
    _, records = read_dlmi(dlmi_root)
    folder = records[0].folder
    (folder / "Thumbs.db").write_bytes(b"\0")
    (folder / "notes.txt").write_text("x")
    (folder / "._000000.jpg").write_bytes(b"\0")  # macOS resource fork
    (folder / "sub").mkdir()
    (folder / "000000.jpg").rename(folder / "000000.JPG")
    (folder / "extra.png").write_bytes((folder / "000001.jpg").read_bytes())
    (dlmi_root / "trainset" / ".ipynb_checkpoints").mkdir()
    _, again = read_dlmi(dlmi_root)
    assert again[0].files == tuple(sorted([*records[0].files[1:], "000000.JPG", "extra.png"]))
    assert [r.files for r in again[1:]] == [r.files for r in records[1:]]


def test_same_patient_in_both_split_folders(dlmi_root: Path) -> None:
    _, records = read_dlmi(dlmi_root)
    train = next(r for r in records if r.folder.parent.name == "trainset")
    shutil.copytree(train.folder, dlmi_root / "testset" / train.patient_id)
    with pytest.raises(DataError, match=train.patient_id):
        read_dlmi(dlmi_root)


@pytest.mark.parametrize("pid", ["P26", "patient_1.a", "0-12"])
def test_plain_ids_are_accepted(pid: str) -> None:
    assert check_patient_id(pid) == pid
