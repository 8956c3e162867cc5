"""The synthetic generator writes the DLMI 2024 layout, deterministically and safely."""

from __future__ import annotations

import csv
import hashlib
import re
from datetime import date, datetime
from pathlib import Path

import pytest
from PIL import Image

from lympho_mil.data import CropSettings, SyntheticSettings, synthetic_datamodule
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.data.synthetic_datamodule import SyntheticDataModule, ensure_synthetic_dlmi

HEADER = "ID,LABEL,GENDER,DOB,LYMPH_COUNT"
TINY = {"n_patients": 12, "image_size": 32, "min_cells": 4, "max_cells": 20}


def build(root: Path, seed: int = 0, **kwargs: object) -> Path:
    return make_synthetic_dlmi(root, seed=seed, **{**TINY, **kwargs})


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("synthetic") / "dlmi")


def test_returns_root_and_writes_exact_headers(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir()) == [
        "clinical_annotation.csv",
        "ground_truth.csv",
        "testset",
        "trainset",
    ]
    first = {
        "clinical_annotation.csv": f",{HEADER}",
        "trainset/trainset_true.csv": HEADER,
        "testset/testset_data.csv": HEADER,
        "ground_truth.csv": "ID,file,abnormal,kind,label,split",
    }
    for name, header in first.items():
        assert (root / name).read_text().splitlines()[0] == header, name


def test_clinical_annotation_lists_all_patients_with_an_integer_index(root: Path) -> None:
    clinical = rows(root / "clinical_annotation.csv")
    assert [r[""] for r in clinical] == [str(i) for i in range(TINY["n_patients"])]
    ids = [r["ID"] for r in clinical]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"P\d+", i) for i in ids)
    assert ids != sorted(ids, key=lambda i: int(i[1:]))  # shuffled, not in id order
    train = {r["ID"]: r for r in rows(root / "trainset/trainset_true.csv")}
    test = {r["ID"]: r for r in rows(root / "testset/testset_data.csv")}
    assert not train.keys() & test.keys() and set(ids) == train.keys() | test.keys()
    for r in clinical:
        split_row = train.get(r["ID"]) or test[r["ID"]]
        assert {k: r[k] for k in split_row} == split_row


def test_labels_hidden_for_test_patients_and_both_classes_in_train(root: Path) -> None:
    train = rows(root / "trainset/trainset_true.csv")
    test = rows(root / "testset/testset_data.csv")
    assert {r["LABEL"] for r in train} == {"0", "1"}
    assert test and {r["LABEL"] for r in test} == {"-1"}


def test_clinical_values_and_both_dob_formats(root: Path) -> None:
    clinical = rows(root / "clinical_annotation.csv")
    assert {r["GENDER"] for r in clinical} <= {"M", "F"}
    slash = [r["DOB"] for r in clinical if "/" in r["DOB"]]
    dash = [r["DOB"] for r in clinical if "-" in r["DOB"]]
    assert slash and dash and len(slash) + len(dash) == len(clinical)
    assert all(re.fullmatch(r"[1-9]\d?/[1-9]\d?/\d{4}", d) for d in slash)  # no zero padding
    assert all(re.fullmatch(r"\d{2}-\d{2}-\d{4}", d) for d in dash)
    births = [datetime.strptime(d, "%m/%d/%Y") for d in slash]
    births += [datetime.strptime(d, "%d-%m-%Y") for d in dash]
    assert all(20 <= (date(2020, 1, 1) - b.date()).days / 365.25 <= 100.01 for b in births)
    for r in clinical:
        assert re.fullmatch(r"\d+\.\d{1,2}", r["LYMPH_COUNT"])
        assert 2.0 <= float(r["LYMPH_COUNT"]) <= 300.0


def test_every_patient_has_a_folder_of_rgb_crops_and_nothing_else(root: Path) -> None:
    for split, table in (("trainset", "trainset_true.csv"), ("testset", "testset_data.csv")):
        ids = {r["ID"] for r in rows(root / split / table)}
        folders = {p.name for p in (root / split).iterdir() if p.is_dir()}
        assert folders == ids
        assert {p.name for p in (root / split).iterdir() if p.is_file()} == {table}
        for pid in ids:
            names = sorted(p.name for p in (root / split / pid).iterdir())
            assert TINY["min_cells"] <= len(names) <= TINY["max_cells"]
            assert names == [f"{i:06d}.jpg" for i in range(len(names))]
            with Image.open(root / split / pid / names[-1]) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))


def test_ground_truth_matches_the_files_and_the_labels(root: Path) -> None:
    truth = rows(root / "ground_truth.csv")
    files = {(p.parent.parent.name, p.parent.name, p.name) for p in root.glob("*/P*/*.jpg")}
    assert {(r["split"], r["ID"], r["file"]) for r in truth} == files
    assert len(truth) == len(files)
    train = {r["ID"]: r["LABEL"] for r in rows(root / "trainset/trainset_true.csv")}
    for r in truth:
        assert r["abnormal"] == str(int(r["kind"] != "normal"))
        assert r["kind"] in {"normal", "cleaved", "smudge", "nucleolus"}
        assert r["label"] in {"0", "1"}
        if r["split"] == "trainset":
            assert r["label"] == train[r["ID"]]
    test_labels = {r["label"] for r in truth if r["split"] == "testset"}
    assert test_labels <= {"0", "1"} and test_labels

    def abnormal_rate(label: str) -> float:
        flags = [int(r["abnormal"]) for r in truth if r["label"] == label]
        return sum(flags) / len(flags)

    assert abnormal_rate("1") > 0.15 > abnormal_rate("0")


def test_same_seed_same_bytes_other_seed_other_bytes(root: Path, tmp_path: Path) -> None:
    assert tree_hash(build(tmp_path / "again")) == tree_hash(root)
    assert tree_hash(build(tmp_path / "other", seed=1)) != tree_hash(root)


def test_refuses_a_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        build(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_only_its_own_outputs(root: Path, tmp_path: Path) -> None:
    target = build(tmp_path / "dlmi", seed=1)
    (target / "notes.txt").write_text("mine")
    (target / "trainset" / "P999999").mkdir()  # a stale patient folder goes with trainset/
    assert build(target, overwrite=True) == target
    assert (target / "notes.txt").read_text() == "mine"
    (target / "notes.txt").unlink()
    assert tree_hash(target) == tree_hash(root)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_patients": 1},
        {"image_size": 8},
        {"test_fraction": 1.0},
        {"min_cells": 0},
        {"min_cells": 21},
        {"tumoral_fraction": 1.0},
        {"jpeg_quality": 0},
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build(tmp_path / "dlmi", **bad)
    assert not (tmp_path / "dlmi").exists()


def test_datamodule_with_fewer_cells_than_the_generators_minimum(tmp_path: Path) -> None:
    dm = SyntheticDataModule(
        root=str(tmp_path / "few"),
        synthetic=SyntheticSettings(n_patients=8, image_size=16, max_cells=8),
        crops=CropSettings(image_size=16),
    )
    assert max(len(b.rows) for b in dm.bags.values()) <= 8


def test_a_dataset_another_process_put_in_place_first_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"

    def racing(out: Path, *args: object, **kwargs: object) -> Path:
        make_synthetic_dlmi(root, *args, **kwargs)  # the other process wins the race
        return make_synthetic_dlmi(out, *args, **kwargs)

    monkeypatch.setattr(synthetic_datamodule, "make_synthetic_dlmi", racing)
    assert ensure_synthetic_dlmi(root, 4, 16, 0, max_cells=4) == root
    assert (root / "clinical_annotation.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folder left


def test_bad_loader_settings_are_refused_before_any_file_is_written(tmp_path: Path) -> None:
    root = tmp_path / "synthetic"
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticDataModule(
            str(root),
            synthetic=SyntheticSettings(n_patients=16),
            loader={"batch_size": 0},  # type: ignore[arg-type]  # as a config gives it
        )
    assert not root.exists()
