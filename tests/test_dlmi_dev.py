"""Opt-in: the real development split ``../shared/data/dlmi-dev`` (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lympho_mil.data import CropSettings, LoaderSettings, PatientBagDataModule, read_dlmi

pytestmark = pytest.mark.shared_data
MAX_INSTANCES = 40


@pytest.fixture(scope="module")
def root(shared_data: Path) -> Path:
    folder = shared_data / "dlmi-dev"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return folder


@pytest.fixture(scope="module")
def dev_datamodule(root: Path, tmp_path_factory: pytest.TempPathFactory) -> PatientBagDataModule:
    cache = tmp_path_factory.mktemp("dlmi_dev_cache")
    return PatientBagDataModule(
        str(root),
        crops=CropSettings(image_size=32, cache_dir=str(cache)),
        loader=LoaderSettings(batch_size=4),
        max_instances=MAX_INSTANCES,
    )


def test_counts_labels_and_ages(root: Path) -> None:
    frame, records = read_dlmi(root)
    assert len(frame) == len(records) == 81
    assert sum(len(r.files) for r in records) == 6761
    assert frame["label"].value_counts().to_dict() == {1: 56, 0: 25}
    assert frame["age"].notna().all() and frame["age"].between(20, 100).all()
    assert set(frame["sex_male"]) == {0.0, 1.0}
    assert frame["lymph_count"].gt(0).all()


def test_batches_of_four_bags(root: Path, dev_datamodule: PatientBagDataModule) -> None:
    dm = dev_datamodule
    dm.setup("fit")
    sizes = {bag_id: len(bag.rows) for bag_id, bag in dm.bags.items()}
    train = next(iter(dm.train_dataloader()))
    assert len(train) == 4
    assert train.mask.sum(1).tolist() == [min(sizes[b], MAX_INSTANCES) for b in train.bag_id]
    assert train.instances.shape[2:] == (3, 32, 32)
    val = next(iter(dm.val_dataloader()))
    assert len(val) == 4
    assert val.mask.sum(1).tolist() == [sizes[b] for b in val.bag_id]
    assert val.instances.shape[1] == max(sizes[b] for b in val.bag_id)
    assert all((root / "trainset" / b).is_dir() for b in val.bag_id)
