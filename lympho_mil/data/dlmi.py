"""Reader for the DLMI lymphocytosis challenge layout (2021 and 2024 editions).

2024 edition::

    root/trainset/trainset_true.csv   ID,LABEL,GENDER,DOB,LYMPH_COUNT
    root/testset/testset_data.csv     same columns, LABEL = -1
    root/trainset/P26/000000.jpg ...  one folder of crops per patient
    root/clinical_annotation.csv      all patients, unnamed index column first

2021 edition: only ``root/clinical_annotation.csv`` (unnamed index column first), with the
patient folders under ``trainset/`` and ``testset/``. When the per-split csv files exist they
are read; otherwise ``clinical_annotation.csv`` is. Nothing under ``root`` is ever written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lympho_mil.data.clinical import read_clinical_csv, validate_clinical
from lympho_mil.data.errors import DataError

SPLIT_CSVS = ("trainset/trainset_true.csv", "testset/testset_data.csv")
ANNOTATION_CSV = "clinical_annotation.csv"
PATIENT_DIRS = ("trainset", "testset")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class PatientRecord:
    """One patient folder: ``label`` 1, 0 or -1 (unknown); ``files`` are the crop file names,
    sorted."""

    patient_id: str
    label: int
    folder: Path
    files: tuple[str, ...]

    @property
    def paths(self) -> list[Path]:
        """The crop files, in the order of ``files``."""
        return [self.folder / name for name in self.files]


def check_patient_id(patient_id: str, source: str | Path = "the clinical csv") -> str:
    """Return ``patient_id`` if it is safe to use as a folder name, else raise DataError.

    Refuses anything that could escape the data root: separators, ``..``, absolute paths.
    ``source`` (the csv it comes from) is named in the error.
    """
    if not patient_id:
        raise DataError(f"empty patient ID in {source} (a blank row?)")
    if not _SAFE_ID.fullmatch(patient_id) or ".." in patient_id:
        raise DataError(
            f"patient id {patient_id!r} in {source} is not a plain folder name (ASCII letters, "
            "digits, '_', '-', '.'; no path separators or '..'); refusing to use it as a path"
        )
    return patient_id


def read_dlmi_table(root: Path) -> pd.DataFrame:
    """The raw clinical rows of ``root`` (per-split csv files if present, else the annotation)."""
    split_csvs = [root / name for name in SPLIT_CSVS if (root / name).is_file()]
    if split_csvs:
        return pd.concat([read_clinical_csv(p) for p in split_csvs], ignore_index=True)
    if (root / ANNOTATION_CSV).is_file():
        return read_clinical_csv(root / ANNOTATION_CSV)
    raise DataError(
        f"no clinical csv under {root}: expected {SPLIT_CSVS[0]} (2024 edition) or "
        f"{ANNOTATION_CSV} (2021 edition)"
    )


def read_dlmi(
    root: str | Path, reference_date: str = "2020-01-01"
) -> tuple[pd.DataFrame, list[PatientRecord]]:
    """Read and validate a DLMI folder ``root``; ages are taken at ``reference_date`` (ISO).

    Returns the validated clinical frame (indexed by patient id, with columns ``label``,
    ``sex_male``, ``age``, ``lymph_count``, ``log_lymph_count``) and one
    `PatientRecord` per csv row, in csv order. Hidden entries (names starting with
    ``.``) are ignored. Raises `DataError` for a missing root or clinical csv, bad
    clinical values, csv rows without a folder, folders without a csv row, a patient with two
    folders, folders without images and unsafe ids.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist or is not a folder (a relative path is read from "
            f"the working directory {Path.cwd()}; --data.root PATH names another)"
        )
    raw = read_dlmi_table(root)
    if raw.empty:
        raise DataError(f"the clinical csv(s) under {root} have a header but no patient rows")
    for pid, source in zip(raw["ID"].str.strip(), raw["source"], strict=True):
        check_patient_id(pid, source)
    frame = validate_clinical(raw, reference_date)

    on_disk: dict[str, Path] = {}
    for split_dir in PATIENT_DIRS:
        base = root / split_dir
        if not base.is_dir():
            continue
        for folder in sorted(_visible(base)):
            if folder.is_dir() and on_disk.setdefault(folder.name, folder) != folder:
                raise DataError(
                    f"patient {folder.name} has two folders: {on_disk[folder.name]} and {folder}"
                )
    missing = [pid for pid in frame.index if pid not in on_disk]
    if missing:
        raise DataError(
            f"patient(s) {missing[:10]} listed in the clinical csv have no folder under "
            f"{[str(root / d) for d in PATIENT_DIRS]}"
        )
    extra = sorted(set(on_disk) - set(frame.index))
    if extra:
        raise DataError(
            f"folder(s) {[str(on_disk[e]) for e in extra[:10]]} have no row in the clinical csv"
        )
    records = []
    for pid, label in frame["label"].items():
        folder = on_disk[pid]
        files = tuple(
            sorted(
                p.name
                for p in _visible(folder)
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        )
        if not files:
            raise DataError(f"patient {pid}: folder {folder} holds no image ({IMAGE_SUFFIXES})")
        records.append(PatientRecord(str(pid), int(label), folder, files))
    return frame, records


def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` except hidden ones (``.ipynb_checkpoints``, macOS ``._*`` files)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]
