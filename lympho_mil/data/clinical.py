"""Clinical table of the DLMI challenge: reading, validation and the clinical vector.

The clinical vector of a patient is ``[age, log(lymph_count), sex_male]`` (``T = 3``). Age is
computed from the date of birth at a reference date; the lymphocyte count is heavily skewed,
so it enters on a log scale. Standardisation is *not* applied here: it is fitted on the
training patients of a split (`fit_standardization`) and carried by the model.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from lympho_mil.data.errors import DataError

CLINICAL_COLUMNS = ("ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT")
FEATURE_NAMES = ("age", "log_lymph_count", "sex_male")
"""The clinical vector, in order: age in years, natural log of the lymphocyte count, 1 if male."""
DOB_FORMATS = ("%m/%d/%Y", "%d-%m-%Y")
VALID_LABELS = (-1, 0, 1)


def read_clinical_csv(path: str | Path) -> pd.DataFrame:
    """Read one clinical csv (either edition) into columns ``ID, LABEL, GENDER, DOB, LYMPH_COUNT``.

    An unnamed first column (the 2021 edition's index) is dropped. Values are validated later
    by `validate_clinical`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"clinical csv not found: {path}")
    try:
        # index_col=False: rows ending in a comma must not shift every value one column left
        table = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot parse clinical csv {path}: {exc}") from exc
    _check_no_extra_values(path)
    table = table.loc[:, [c for c in table.columns if not c.startswith("Unnamed")]]
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in CLINICAL_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {missing}; expected {list(CLINICAL_COLUMNS)}, "
            f"found {list(table.columns)}"
        )
    table = table.loc[:, list(CLINICAL_COLUMNS)].copy()
    table["source"] = str(path)
    return table


def _check_no_extra_values(path: Path) -> None:
    """Refuse rows with more values than the header has columns (pandas would drop them
    with a mere warning: ``12,5`` for 12.5 would read as 12). Empty extras (rows ending in a
    comma) are harmless."""
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = next(reader, [])
        for row in reader:
            extra = [value for value in row[len(header) :] if value.strip()]
            if extra:
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(row)} values for {len(header)} "
                    f"columns (extra {extra}); quote a value that holds a comma"
                )


def parse_dob(value: str, patient: str) -> date:
    """Parse a date of birth in either challenge format (``11/3/1933`` or ``27-08-1951``)."""
    text = value.strip()
    for fmt in DOB_FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise DataError(
        f"patient {patient}: unparseable DOB {value!r}; expected one of {list(DOB_FORMATS)}"
    )


def validate_clinical(table: pd.DataFrame, reference_date: str = "2020-01-01") -> pd.DataFrame:
    """Validate the raw table and add typed columns.

    Returns a frame indexed by patient id with columns ``label`` (int), ``sex_male`` (0/1),
    ``age`` (years at ``reference_date``), ``lymph_count`` (float), ``log_lymph_count``.
    Raises `DataError` naming the patient for every bad value.
    """
    ref = date.fromisoformat(reference_date)
    ids = table["ID"].str.strip()
    duplicated = ids.duplicated(keep=False)
    if duplicated.any():
        pairs = sorted(set(zip(ids[duplicated], table.loc[duplicated, "source"], strict=True)))
        raise DataError(f"duplicate patient id(s) in the clinical table (id, file): {pairs}")
    rows = []
    for pid, (_, row) in zip(ids, table.iterrows(), strict=True):
        where = f"patient {pid} ({row['source']})"
        if not pid:
            raise DataError(f"empty patient ID in {row['source']}")
        try:
            label = float(row["LABEL"])
        except ValueError:
            label = None
        if label not in VALID_LABELS:
            raise DataError(f"{where}: LABEL {row['LABEL']!r} not in {list(VALID_LABELS)}")
        sex = str(row["GENDER"]).strip().upper()
        if sex not in ("M", "F"):
            raise DataError(f"{where}: GENDER {row['GENDER']!r} is neither M nor F")
        try:
            count = float(row["LYMPH_COUNT"])
        except ValueError:
            count = float("nan")
        if not np.isfinite(count) or count <= 0:
            raise DataError(
                f"{where}: LYMPH_COUNT {row['LYMPH_COUNT']!r} must be a positive number"
            )
        dob = parse_dob(str(row["DOB"]), f"{pid} ({row['source']})")
        age = (ref - dob).days / 365.25
        rows.append((pid, int(label), float(sex == "M"), age, count, float(np.log(count))))
    frame = pd.DataFrame(
        rows, columns=["id", "label", "sex_male", "age", "lymph_count", "log_lymph_count"]
    )
    return frame.set_index("id")


def clinical_features(frame: pd.DataFrame, ids: Sequence[str]) -> np.ndarray:
    """float32[P, T]: the clinical vector (`FEATURE_NAMES`) of the given patients."""
    return frame.loc[list(ids), list(FEATURE_NAMES)].to_numpy(dtype=np.float32)


def fit_standardization(features: np.ndarray) -> dict[str, list[float]]:
    """Means and scales of ``features[P, T]`` as plain numbers (checkpoint-friendly).

    A constant column gets scale 1 so standardising never divides by zero. Returns
    ``{"mean": [T values], "scale": [T values]}``; raises ValueError unless ``features`` is a
    non-empty 2-D array.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"need a non-empty [patients, T] array, got shape {features.shape}")
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    return {"mean": [float(v) for v in mean], "scale": [float(v) for v in scale]}
