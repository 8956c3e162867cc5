"""Bad input gets a DataError whose message names the culprit; odd images are converted.

Also: nothing under the data root is ever written.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lympho_mil.data import CropSettings, DataError, LoaderSettings, PatientBagDataModule, read_dlmi

TRAIN_CSV = Path("trainset") / "trainset_true.csv"
TEST_CSV = Path("testset") / "testset_data.csv"


def raises_data_error(*names: object) -> pytest.RaisesExc[DataError]:
    """Expect a DataError whose message names every one of ``names`` (ids, paths)."""
    lookaheads = "".join(f"(?=.*{re.escape(str(n))})" for n in names)
    return pytest.raises(DataError, match=f"(?s){lookaheads}")


def train_ids(root: Path) -> list[str]:
    return pd.read_csv(root / TRAIN_CSV, dtype=str)["ID"].tolist()


def first_train_id(root: Path) -> str:
    return train_ids(root)[0]


def set_value(root: Path, pid: str, column: str, value: str) -> None:
    table = pd.read_csv(root / TRAIN_CSV, dtype=str, keep_default_na=False)
    table.loc[table["ID"] == pid, column] = value
    table.to_csv(root / TRAIN_CSV, index=False)


def datamodule(
    root: Path, cache_dir: Path, crops: dict | None = None, **kwargs: object
) -> PatientBagDataModule:
    crops = {"image_size": 16, "cache_dir": str(cache_dir), **(crops or {})}
    return PatientBagDataModule(str(root), crops=crops, **kwargs)  # type: ignore[arg-type]


def only_patient(root: Path, cache_dir: Path, **kwargs: object) -> PatientBagDataModule:
    """A datamodule that trains on the first training patient and validates on the second."""
    first, second = train_ids(root)[:2]
    return datamodule(root, cache_dir, split={"train_ids": [first], "val_ids": [second]}, **kwargs)


def first_image(root: Path, pid: str) -> Path:
    return sorted((root / "trainset" / pid).iterdir())[0]


# -- clinical csv ------------------------------------------------------------------------------
def test_missing_csv(dlmi_root: Path) -> None:
    for name in (TRAIN_CSV, TEST_CSV, Path("clinical_annotation.csv")):
        (dlmi_root / name).unlink()
    with raises_data_error(dlmi_root, "clinical_annotation.csv", "trainset_true.csv"):
        read_dlmi(dlmi_root)


def test_missing_root(tmp_path: Path, cache_dir: Path) -> None:
    missing = tmp_path / "nowhere"
    with raises_data_error(missing, "does not exist"):
        datamodule(missing, cache_dir).setup("fit")


def test_missing_columns(dlmi_root: Path) -> None:
    table = pd.read_csv(dlmi_root / TRAIN_CSV, dtype=str)
    table.drop(columns=["LYMPH_COUNT"]).to_csv(dlmi_root / TRAIN_CSV, index=False)
    with raises_data_error(dlmi_root / TRAIN_CSV, "LYMPH_COUNT"):
        read_dlmi(dlmi_root)


def test_rows_ending_in_a_comma_keep_their_columns(dlmi_root: Path) -> None:
    csv = dlmi_root / TRAIN_CSV
    header, *rows = csv.read_text().splitlines()
    csv.write_text("\n".join([header, *(r + "," for r in rows)]) + "\n")
    frame, _ = read_dlmi(dlmi_root)
    expected = pd.read_csv(dlmi_root / TRAIN_CSV, dtype=str, index_col=False)
    assert set(expected["ID"]) <= set(frame.index)
    assert (frame.loc[expected["ID"], "label"].to_numpy() == expected["LABEL"].astype(int)).all()


def test_a_row_with_a_value_too_many_is_refused(dlmi_root: Path) -> None:
    """An unquoted decimal comma (``12,5``) must not read as 12 with the 5 dropped."""
    csv = dlmi_root / TRAIN_CSV
    header, first, *rows = csv.read_text().splitlines()
    csv.write_text("\n".join([header, first + ",5", *rows]) + "\n")
    with raises_data_error(csv, "line 2", "extra ['5']"):
        read_dlmi(dlmi_root)


def test_a_blank_row_is_named_as_such(dlmi_root: Path) -> None:
    csv = dlmi_root / TRAIN_CSV
    csv.write_text(csv.read_text() + ",,,,\n")
    with raises_data_error("empty patient ID", csv, "blank row"):
        read_dlmi(dlmi_root)


def test_no_patient_rows(tmp_path: Path) -> None:
    root = tmp_path / "dlmi"
    (root / "trainset").mkdir(parents=True)
    (root / TRAIN_CSV).write_text("ID,LABEL,GENDER,DOB,LYMPH_COUNT\n")
    with raises_data_error("no patient rows"):
        read_dlmi(root)


def test_duplicate_ids(dlmi_root: Path) -> None:
    pid = first_train_id(dlmi_root)
    row = next(r for r in (dlmi_root / TRAIN_CSV).read_text().splitlines() if r.startswith(pid))
    with open(dlmi_root / TEST_CSV, "a") as handle:
        handle.write(row + "\n")
    with raises_data_error(pid, "duplicate", TRAIN_CSV, TEST_CSV):
        read_dlmi(dlmi_root)


@pytest.mark.parametrize("label", ["2", "-2", "abc", "", "0.5", "inf", "nan"])
def test_label_not_in_allowed_set(dlmi_root: Path, label: str) -> None:
    pid = first_train_id(dlmi_root)
    set_value(dlmi_root, pid, "LABEL", label)
    with raises_data_error(pid, TRAIN_CSV, "LABEL"):
        read_dlmi(dlmi_root)


@pytest.mark.parametrize("dob", ["", "1933-11-03", "13/13/1950", "31-02-1950", "yesterday"])
def test_unparseable_dob(dlmi_root: Path, dob: str) -> None:
    pid = first_train_id(dlmi_root)
    set_value(dlmi_root, pid, "DOB", dob)
    with raises_data_error(pid, TRAIN_CSV, "DOB"):
        read_dlmi(dlmi_root)


@pytest.mark.parametrize("count", ["", "0", "-3.5", "nan", "inf", "many"])
def test_bad_lymph_count(dlmi_root: Path, count: str) -> None:
    pid = first_train_id(dlmi_root)
    set_value(dlmi_root, pid, "LYMPH_COUNT", count)
    with raises_data_error(pid, TRAIN_CSV, "LYMPH_COUNT"):
        read_dlmi(dlmi_root)


def test_bad_gender(dlmi_root: Path) -> None:
    pid = first_train_id(dlmi_root)
    set_value(dlmi_root, pid, "GENDER", "X")
    with raises_data_error(pid, TRAIN_CSV, "GENDER"):
        read_dlmi(dlmi_root)


@pytest.mark.parametrize("bad_id", ["../x", "/etc/x", "a/b", "..", "x\\y"])
def test_id_escaping_the_root(dlmi_root: Path, bad_id: str) -> None:
    set_value(dlmi_root, first_train_id(dlmi_root), "ID", bad_id)
    with raises_data_error(repr(bad_id), TRAIN_CSV):
        read_dlmi(dlmi_root)


# -- folders ------------------------------------------------------------------------------------
def test_csv_id_without_folder(dlmi_root: Path) -> None:
    pid = first_train_id(dlmi_root)
    for path in (dlmi_root / "trainset" / pid).iterdir():
        path.unlink()
    (dlmi_root / "trainset" / pid).rmdir()
    with raises_data_error(pid, "no folder"):
        read_dlmi(dlmi_root)


def test_folder_without_csv_row(dlmi_root: Path) -> None:
    stray = dlmi_root / "testset" / "P999"
    stray.mkdir()
    Image.new("RGB", (32, 32)).save(stray / "000000.jpg")
    with raises_data_error(stray, "no row"):
        read_dlmi(dlmi_root)


def test_empty_patient_folder(dlmi_root: Path) -> None:
    pid = first_train_id(dlmi_root)
    folder = dlmi_root / "trainset" / pid
    for path in folder.iterdir():
        path.unlink()
    (folder / "notes.txt").write_text("not an image")
    with raises_data_error(pid, folder, "no image"):
        read_dlmi(dlmi_root)


# -- images -------------------------------------------------------------------------------------
def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"not a jpeg" * 10)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_bad_jpeg_is_an_error_by_default(dlmi_root: Path, cache_dir: Path, how: str) -> None:
    bad = first_image(dlmi_root, first_train_id(dlmi_root))
    corrupt(bad, how)
    with pytest.raises(DataError) as excinfo:
        datamodule(dlmi_root, cache_dir).setup("fit")
    assert excinfo.type is DataError  # raised in the decoding thread pool, not wrapped
    assert str(bad) in str(excinfo.value) and bad.parent.name in str(excinfo.value)
    assert "skip_bad_images=True" in str(excinfo.value)
    assert not list(cache_dir.glob("*.npy")) and not list(cache_dir.glob("*.tmp*"))


def test_bad_jpeg_skipped_with_warning_on_request(dlmi_root: Path, cache_dir: Path) -> None:
    pid = first_train_id(dlmi_root)
    bad = first_image(dlmi_root, pid)
    n_files = len(list(bad.parent.iterdir()))
    corrupt(bad, "truncated")
    dm = only_patient(dlmi_root, cache_dir, crops={"skip_bad_images": True})
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        dm.setup("fit")
    (sample,) = dm.datasets["train"]
    assert len(sample.instance_id) == n_files - 1 and bad.name not in sample.instance_id
    # the cache remembers the bad file: loading again warns again, and refuses without opt-in
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        only_patient(dlmi_root, cache_dir, crops={"skip_bad_images": True}).setup("fit")
    with raises_data_error(bad, "skip_bad_images"):
        only_patient(dlmi_root, cache_dir).setup("fit")


def test_patient_without_any_readable_image(dlmi_root: Path, cache_dir: Path) -> None:
    pid = first_train_id(dlmi_root)
    for path in (dlmi_root / "trainset" / pid).iterdir():
        corrupt(path, "garbage")
    with pytest.warns(UserWarning), raises_data_error(pid, "no readable image"):
        datamodule(dlmi_root, cache_dir, crops={"skip_bad_images": True}).setup("fit")


def test_grayscale_rgba_and_other_sizes_are_converted(dlmi_root: Path, cache_dir: Path) -> None:
    pid = first_train_id(dlmi_root)
    folder = dlmi_root / "trainset" / pid
    Image.new("L", (32, 32), 90).save(folder / "000000.jpg", quality=100)
    Image.new("RGBA", (32, 32), (200, 40, 10, 128)).save(folder / "000001.png")
    Image.new("RGB", (50, 40), (10, 200, 30)).save(folder / "000002.jpg", quality=100)
    dm = only_patient(
        dlmi_root, cache_dir, augment={"mode": "none"}, crops={"mean": (0, 0, 0), "std": (1, 1, 1)}
    )
    dm.setup("fit")
    (sample,) = dm.datasets["train"]
    names = sample.instance_id
    assert sample.instances.shape[1:] == (3, 16, 16)
    pixels = (sample.instances * 255).round()
    gray = pixels[names.index("000000.jpg")]
    assert (gray - 90).abs().max() <= 2
    np.testing.assert_allclose(pixels[names.index("000001.png")].mean((1, 2)), [200, 40, 10])
    resized = pixels[names.index("000002.jpg")].mean((1, 2))
    np.testing.assert_allclose(resized, [10, 200, 30], atol=3)


# -- the data root stays untouched -----------------------------------------------------------
def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        if p.is_file()
        else ("dir", 0)
        for p in sorted(root.rglob("*"))
    }


def test_data_root_is_never_modified(
    synthetic_dlmi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = tree_digest(synthetic_dlmi)
    monkeypatch.setenv("LYMPHO_MIL_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.chdir(synthetic_dlmi)  # relative paths would land here
    dm = PatientBagDataModule(
        str(synthetic_dlmi),
        crops=CropSettings(image_size=16),
        loader=LoaderSettings(batch_size=3),
        max_instances=5,
    )
    for stage in ("fit", "test", "predict"):
        dm.setup(stage)
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    for batch in (b for loader in [*loaders, dm.predict_dataloader()] for b in loader):
        assert batch.mask.any(dim=1).all()
    assert list((tmp_path / "default-cache").glob("crops-*.npy"))
    assert tree_digest(synthetic_dlmi) == before


def test_too_few_labelled_patients_to_split(dlmi_root: Path, cache_dir: Path) -> None:
    """One patient of a label cannot be stratified: fit names the setting and the counts,
    while the standardisation (and predict, with a checkpoint) carries on without a split."""
    table = pd.read_csv(dlmi_root / TRAIN_CSV, dtype=str)
    labelled = table[table["LABEL"] != "-1"]
    keep = [labelled[labelled["LABEL"] == "0"].index[0], *labelled[labelled["LABEL"] == "1"].index]
    keep += list(table[table["LABEL"] == "-1"].index)
    for pid in table.drop(index=keep)["ID"]:
        shutil.rmtree(dlmi_root / "trainset" / pid)
    table.loc[keep].to_csv(dlmi_root / TRAIN_CSV, index=False)
    dm = datamodule(dlmi_root, cache_dir)
    with raises_data_error("val_fraction=0.2", "1 of label 0"):
        dm.split_ids  # noqa: B018
    assert dm.tabular_stats["scale"] == [1.0] * dm.tabular_dim  # no training split: identity


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_instances", 0),
        ("split.n_folds", 1),
        ("loader.num_workers", -1),
        ("loader.batch_size", 0),
        ("augment.affine", 2.0),
        ("augment.color_jitter", -0.5),
        ("augment.mode", "sometimes"),
        ("crops.std", (0.2, 0.0, 0.2)),
        ("crops.mean", (0.5, 0.5)),
    ],
)
def test_datamodule_settings_that_cannot_work_are_named_at_construction(
    dlmi_root: Path, cache_dir: Path, setting: str, value: object
) -> None:
    """Grouped settings are checked as given in a config: plain mappings."""
    group, _, name = setting.rpartition(".")
    with pytest.raises(ValueError, match=name):
        datamodule(dlmi_root, cache_dir, **({group: {name: value}} if group else {name: value}))


@pytest.mark.parametrize(("setting", "value"), [("val_fraction", 0.0), ("test_fraction", 1.0)])
def test_split_fractions_out_of_range(
    dlmi_root: Path, cache_dir: Path, setting: str, value: float
) -> None:
    with pytest.raises(ValueError, match=setting):
        datamodule(dlmi_root, cache_dir, split={setting: value})
