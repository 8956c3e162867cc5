"""PatientBagDataModule: patient-level splits, bags per stage, collate, transforms, BagBatch."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning import seed_everything
from lightning.fabric.utilities import move_data_to_device

from lympho_mil.arguments import SettingError
from lympho_mil.data import (
    BagBatch,
    BagSample,
    CropSettings,
    CropSpec,
    DataError,
    PatientBagDataModule,
    SplitSettings,
    collate_bags,
)
from lympho_mil.data.image_cache import decode_crop
from lympho_mil.data.pseudo_labels import UNSURE, clinical_teacher_labels
from lympho_mil.data.splits import holdout_split, kfold_split
from lympho_mil.data.transforms import train_augmentation

SIZE = 16


@pytest.fixture
def make_dm(synthetic_dlmi: Path):
    """PatientBagDataModule on the shared synthetic folder (16 px, the session cache)."""

    def make(crops: dict | None = None, **kwargs: object) -> PatientBagDataModule:
        crops = {"image_size": SIZE, **(crops or {})}
        return PatientBagDataModule(str(synthetic_dlmi), crops=crops, **kwargs)  # type: ignore[arg-type]

    return make


def labels_of(dm: PatientBagDataModule, ids: list[str]) -> Counter:
    return Counter(dm.bags[i].label for i in ids)


def labelled(dm: PatientBagDataModule) -> set[str]:
    return {i for i, bag in dm.bags.items() if bag.label in (0, 1)}


# -- splits -------------------------------------------------------------------------------------
def test_holdout_is_patient_level_stratified_reproducible(make_dm) -> None:
    dm = make_dm(split={"val_fraction": 0.3}, seed=0)
    train, val = dm.split_ids["train"], dm.split_ids["val"]
    assert not set(train) & set(val) and set(train) | set(val) == labelled(dm)
    assert labels_of(dm, val) == Counter({1: 2, 0: 1})  # 6 tumoral, 3 reactive labelled
    assert dm.split_ids["test"] == []
    assert make_dm(split={"val_fraction": 0.3}, seed=0).split_ids == dm.split_ids
    assert (
        len(
            {tuple(make_dm(split={"val_fraction": 0.3}, seed=s).split_ids["val"]) for s in range(8)}
        )
        > 1
    )


def test_kfold_is_patient_level_stratified_reproducible(make_dm) -> None:
    folds = [make_dm(split={"n_folds": 3, "fold": k}, seed=3).split_ids for k in range(3)]
    vals = [set(f["val"]) for f in folds]
    everyone = labelled(make_dm())
    assert set.union(*vals) == everyone and sum(map(len, vals)) == len(everyone)
    for split in folds:
        assert set(split["train"]) == everyone - set(split["val"])
        assert labels_of(make_dm(), split["val"]) == Counter({1: 2, 0: 1})
    assert make_dm(split={"n_folds": 3, "fold": 1}, seed=3).split_ids == folds[1]
    assert any(
        make_dm(split={"n_folds": 3, "fold": 1}, seed=s).split_ids != folds[1] for s in range(4, 8)
    )


def test_test_fraction_is_held_out_of_every_fold(make_dm) -> None:
    folds = [
        make_dm(split={"test_fraction": 0.3, "n_folds": 2, "fold": k}).split_ids for k in range(2)
    ]
    test = set(folds[0]["test"])
    assert len(test) == 3 and all(set(f["test"]) == test for f in folds)
    for split in folds:
        assert not test & (set(split["train"]) | set(split["val"]))
    assert test | set(folds[0]["train"]) | set(folds[0]["val"]) == labelled(make_dm())


def test_splits_keep_class_ratios_at_scale() -> None:
    ids = [f"P{i}" for i in range(100)]
    labels = [int(i < 70) for i in range(100)]
    rest, held = holdout_split(ids, labels, 0.2, seed=0)
    assert len(held) == 20 and sum(int(i[1:]) < 70 for i in held) == 14
    assert not set(rest) & set(held) and len(rest) + len(held) == 100
    vals = [kfold_split(ids, labels, 5, k, seed=1)[1] for k in range(5)]
    assert sorted(i for v in vals for i in v) == sorted(ids)
    assert all(sum(int(i[1:]) < 70 for i in v) == 14 for v in vals)


def test_explicit_ids_override_the_policy(make_dm) -> None:
    ids = sorted(labelled(make_dm()))
    dm = make_dm(
        split={
            "n_folds": 3,
            "test_fraction": 0.3,
            "train_ids": ids[:5],
            "val_ids": ids[5:7],
            "test_ids": ids[7:],
        }
    )
    assert dm.split_ids["train"] == ids[:5]
    assert dm.split_ids["val"] == ids[5:7] and dm.split_ids["test"] == ids[7:]
    unlabelled = sorted(set(make_dm().bags) - set(ids))
    for bad, culprit in [
        ({"train_ids": [*ids[:2], "nobody"]}, "nobody"),
        ({"train_ids": ids[:2], "val_ids": ids[1:3]}, ids[1]),
        ({"train_ids": [ids[0], unlabelled[0]]}, unlabelled[0]),
    ]:
        with pytest.raises(DataError, match=culprit):
            _ = make_dm(split=bad).split_ids


def test_predict_on_unlabelled_or_given_ids(make_dm, synthetic_dlmi: Path) -> None:
    unlabelled = pd.read_csv(synthetic_dlmi / "testset" / "testset_data.csv")["ID"].tolist()
    dm = make_dm(loader={"batch_size": 8})
    assert sorted(dm.split_ids["predict"]) == sorted(unlabelled)
    (batch,) = dm.predict_dataloader()
    assert sorted(batch.bag_id) == sorted(unlabelled) and (batch.label == -1).all()
    chosen = sorted(labelled(dm))[:2]
    (batch,) = make_dm(predict_ids=chosen, loader={"batch_size": 8}).predict_dataloader()
    assert batch.bag_id == chosen
    with pytest.raises(DataError, match="nobody"):
        _ = make_dm(predict_ids=["nobody"]).split_ids


def test_setup_all_stages_without_unlabelled_patients(dlmi_root: Path, cache_dir: Path) -> None:
    test_csv = dlmi_root / "testset" / "testset_data.csv"
    for pid in pd.read_csv(test_csv)["ID"]:
        for path in (dlmi_root / "testset" / pid).iterdir():
            path.unlink()
        (dlmi_root / "testset" / pid).rmdir()
    test_csv.unlink()
    dm = PatientBagDataModule(
        str(dlmi_root), crops=CropSettings(image_size=SIZE, cache_dir=str(cache_dir))
    )
    dm.setup()
    assert {"train", "val", "test"} <= set(dm.datasets)
    with pytest.raises(DataError, match="predict"):
        dm.predict_dataloader()


# -- bags per stage -------------------------------------------------------------------------------
def train_instance_ids(dm: PatientBagDataModule, epoch: int = 0) -> dict[str, list[str]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
    return {
        b: ids for batch in loader for b, ids in zip(batch.bag_id, batch.instance_id, strict=True)
    }


def test_max_instances_caps_training_bags_only(make_dm) -> None:
    dm = make_dm(
        max_instances=5,
        loader={"batch_size": 3},
        split={"test_fraction": 0.25},
        augment={"mode": "none"},
    )
    dm.setup("fit")
    dm.setup("test")
    dm.setup("predict")
    for batch in dm.train_dataloader():
        sizes = [len(dm.bags[b].rows) for b in batch.bag_id]
        assert batch.mask.sum(1).tolist() == [min(n, 5) for n in sizes]
        assert batch.instances.shape[1] == max(min(n, 5) for n in sizes)
    assert max(len(dm.bags[b].rows) for b in dm.split_ids["train"]) > 5  # the cap bites
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        for batch in loader:
            assert batch.mask.sum(1).tolist() == [len(dm.bags[b].rows) for b in batch.bag_id]
            assert [len(i) for i in batch.instance_id] == batch.mask.sum(1).tolist()
            assert batch.instance_id == [list(dm.bags[b].instance_ids) for b in batch.bag_id]


def test_training_subsets_depend_on_seed_and_epoch_only(make_dm) -> None:
    dm = make_dm(max_instances=4, augment={"mode": "none"})
    epoch0, epoch1 = train_instance_ids(dm, 0), train_instance_ids(dm, 1)
    assert epoch0 != epoch1
    seed_everything(123)  # the global RNG plays no part: a resumed run replays epoch 1 exactly
    assert train_instance_ids(make_dm(max_instances=4, augment={"mode": "none"}), 1) == epoch1
    assert (
        train_instance_ids(make_dm(max_instances=4, augment={"mode": "none"}, seed=5), 1) != epoch1
    )
    for bag_id, names in epoch0.items():
        assert len(names) == 4 and set(names) <= set(dm.bags[bag_id].instance_ids)


def test_a_loader_with_workers_draws_the_epoch_set_after_iter(make_dm) -> None:
    """Lightning creates a resumed run's training iterator before it sets the sampler's epoch;
    the first batch must still come from that epoch (workers prefetch at creation)."""
    dm = make_dm(max_instances=4, augment={"mode": "none"}, loader={"num_workers": 1})
    expected = train_instance_ids(dm, 1)
    loader = make_dm(
        max_instances=4, augment={"mode": "none"}, loader={"num_workers": 1}
    ).train_dataloader()
    batches = iter(loader)  # as FitLoop.setup_data does on resuming
    loader.sampler.set_epoch(1)  # then FitLoop.on_advance_start
    first = next(batches)
    assert first.instance_id == [expected[b] for b in first.bag_id]


def test_batches_hold_several_padded_bags(make_dm) -> None:
    dm = make_dm(loader={"batch_size": 4}, augment={"mode": "none"})
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, BagBatch) and len(batch) == 4
    sizes = [len(dm.bags[b].rows) for b in batch.bag_id]
    assert len(set(sizes)) > 1  # padding is exercised
    assert batch.instances.shape == (4, max(sizes), 3, SIZE, SIZE)
    assert batch.mask.sum(1).tolist() == sizes and batch.bag_sizes.tolist() == sizes
    assert batch.tabular.shape == (4, 3) and batch.tabular.dtype == torch.float32
    expected = np.stack([dm.bags[b].tabular for b in batch.bag_id])
    np.testing.assert_allclose(batch.tabular.numpy(), expected)


# -- collate ------------------------------------------------------------------------------------
def sample(instances: torch.Tensor, name: str, label: float = 1.0, t: int = 2) -> BagSample:
    names = [f"{name}_{i}" for i in range(len(instances))]
    return BagSample(instances, torch.arange(t, dtype=torch.float32), label, name, names)


@pytest.mark.parametrize("shape", [(3, 4, 4), (8,)], ids=["images", "features"])
def test_collate_pads_to_the_largest_bag(shape: tuple[int, ...]) -> None:
    bags = [torch.randn(n, *shape) + 5 for n in (2, 5, 3)]
    batch = collate_bags([sample(b, f"b{i}", label=i - 1) for i, b in enumerate(bags)])
    assert batch.instances.shape == (3, 5, *shape)
    assert batch.mask.dtype == torch.bool
    assert batch.mask.tolist() == [[True] * 2 + [False] * 3, [True] * 5, [True] * 3 + [False] * 2]
    for i, bag in enumerate(bags):
        torch.testing.assert_close(batch.instances[i, : len(bag)], bag)
    assert (batch.instances[~batch.mask] == 0).all()
    assert batch.label.tolist() == [-1.0, 0.0, 1.0] and batch.label.dtype == torch.float32
    assert batch.bag_id == ["b0", "b1", "b2"] and batch.instance_id[0] == ["b0_0", "b0_1"]
    assert batch.tabular.shape == (3, 2)
    assert collate_bags([sample(bags[0], "x", t=0)]).tabular.shape == (1, 0)


def test_collate_names_bags_of_another_crop_size() -> None:
    bags = [sample(torch.zeros(2, 3, 8, 8), "a"), sample(torch.zeros(2, 3, 16, 16), "b")]
    with pytest.raises(ValueError, match=r"bags \['b'\].*\(3, 8, 8\)"):
        collate_bags(bags)


def test_batch_to_device_and_pin_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = collate_bags([sample(torch.randn(n, 4), f"b{n}") for n in (1, 3)])
    moved = batch.to("meta")
    for name in ("instances", "mask", "tabular", "label"):
        tensor = getattr(moved, name)
        assert tensor.device.type == "meta" and tensor.shape == getattr(batch, name).shape
    assert moved.bag_id == batch.bag_id and moved.instance_id == batch.instance_id
    assert batch.to(torch.device("cpu"), non_blocking=True).mask.equal(batch.mask)
    lightning_moved = move_data_to_device(batch, torch.device("meta"))  # what Trainers call
    assert isinstance(lightning_moved, BagBatch) and lightning_moved.instances.is_meta

    pinned: list[tuple[int, ...]] = []

    def fake_pin(self: torch.Tensor, *args: object) -> torch.Tensor:
        pinned.append(tuple(self.shape))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = batch.pin_memory()
    assert isinstance(out, BagBatch) and len(pinned) == 4
    torch.testing.assert_close(out.instances, batch.instances)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batch_pin_memory_on_cuda() -> None:
    batch = collate_bags([sample(torch.randn(n, 4), f"b{n}") for n in (1, 3)]).pin_memory()
    assert batch.instances.is_pinned() and batch.mask.is_pinned()
    assert batch.to("cuda", non_blocking=True).instances.is_cuda


# -- transforms ---------------------------------------------------------------------------------
def test_train_pipeline_steps_are_configurable() -> None:
    names = [type(t).__name__ for t in train_augmentation()]
    assert names == ["HorizontalFlip", "VerticalFlip", "RandomRotate90", "Affine", "ColorJitter"]
    names = [type(t).__name__ for t in train_augmentation(affine=0, color_jitter=0)]
    assert names == ["HorizontalFlip", "VerticalFlip", "RandomRotate90"]


def test_train_augments_eval_is_deterministic(make_dm) -> None:
    dm = make_dm(
        augment={"affine": 0.0, "color_jitter": 0.0}, crops={"mean": (0, 0, 0), "std": (1, 1, 1)}
    )
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    torch.testing.assert_close(val[0].instances, val[0].instances)
    draws = [train[0].instances for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # flips and right-angle rotations only move pixels: each crop keeps its pixel values
    for draw in draws[1:]:
        for a, b in zip(draw, draws[0], strict=True):
            torch.testing.assert_close(a.flatten().sort().values, b.flatten().sort().values)
    plain = make_dm(augment={"mode": "none"})
    plain.setup("fit")
    torch.testing.assert_close(
        plain.datasets["train"][0].instances, plain.datasets["train"][0].instances
    )


@pytest.mark.parametrize(
    "mean, std", [((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), ((0.5, 0.4, 0.3), (0.2, 0.25, 0.5))]
)
def test_normalisation_constants(make_dm, mean, std) -> None:
    dm = make_dm(crops={"mean": mean, "std": std}, loader={"batch_size": 1})
    dm.setup("validate")
    item = dm.datasets["val"][0]
    paths = [dm.source.root / "trainset" / item.bag_id / name for name in item.instance_id]
    pixels = np.stack([decode_crop(p, CropSpec(SIZE)) for p in paths]) / 255.0
    expected = (pixels - np.array(mean)) / np.array(std)
    torch.testing.assert_close(
        item.instances, torch.from_numpy(expected).permute(0, 3, 1, 2).float()
    )


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    dm = PatientBagDataModule(str(tmp_path / "absent"), crops=CropSettings(image_size=SIZE))
    with pytest.raises(DataError, match="absent"):
        dm.setup("fit")
    with pytest.raises(DataError, match="absent"):
        _ = dm.tabular_stats


# -- co-training: unlabelled patients with the clinical teacher's label ----------------------


def test_the_clinical_teacher_labels_only_the_patients_it_is_sure_of() -> None:
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(-2, 1, (30, 2)), rng.normal(2, 1, (30, 2))])
    labels = np.repeat([0, 1], 30)
    pool = np.array([[-6.0, -6.0], [6.0, 6.0], [0.0, 0.0]])
    assert clinical_teacher_labels(train, labels, pool, 0.9).tolist() == [0, 1, UNSURE]
    assert UNSURE not in clinical_teacher_labels(train, labels, pool[:2], 0.5)
    assert clinical_teacher_labels(train, labels, pool[:0], 0.9).shape == (0,)
    for bad in (0.4, 1.0):
        with pytest.raises(SettingError, match="confidence"):
            SplitSettings(teacher_confidence=bad)


def test_teacher_labelled_patients_train_with_that_label(make_dm) -> None:
    ids = sorted(labelled(make_dm()))
    split = {"train_ids": ids[:6], "val_ids": ids[6:8], "test_ids": ids[8:]}
    plain = make_dm(split=split)
    dm = make_dm(split={**split, "teacher_confidence": 0.5}, loader={"batch_size": 16})
    unlabelled = sorted(set(dm.bags) - set(ids))
    # the teacher is fitted on the training split alone (not on val or test patients)
    expected = clinical_teacher_labels(
        np.stack([dm.bags[i].tabular for i in ids[:6]]),
        np.array([dm.bags[i].label for i in ids[:6]]),
        np.stack([dm.bags[i].tabular for i in unlabelled]),
        0.5,
    )
    assert dm.teacher_labels == dict(zip(unlabelled, expected.tolist(), strict=True))
    assert dm.split_ids["train"] == ids[:6] + list(dm.teacher_labels)
    assert sorted(dm.teacher_labels) == unlabelled  # confidence 0.5: the teacher labels all
    for stage in ("val", "test", "predict"):
        assert dm.split_ids[stage] == plain.split_ids[stage]
    (batch,) = dm.train_dataloader()
    trained = dict(zip(batch.bag_id, batch.label.tolist(), strict=True))
    assert trained == {i: float(dm.bags[i].label) for i in ids[:6]} | {
        i: float(label) for i, label in dm.teacher_labels.items()
    }
    assert all(dm.bags[i].label == -1 for i in unlabelled)  # the data itself is unchanged
    assert dm.checkpoint_record()["teacher_labels"] == dm.teacher_labels
    assert "teacher_labels" not in plain.checkpoint_record() and plain.teacher_labels == {}


def test_co_training_without_unlabelled_patients_says_so(
    synthetic_dlmi: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "labelled_only"
    folder.mkdir()
    (folder / "trainset").symlink_to(synthetic_dlmi / "trainset", target_is_directory=True)
    split = {"val_fraction": 0.3, "teacher_confidence": 0.9}
    dm = PatientBagDataModule(str(folder), crops={"image_size": SIZE}, split=split)
    with caplog.at_level(logging.WARNING, logger="lympho_mil"):
        assert dm.teacher_labels == {}
    assert "no unlabelled patients" in caplog.text
    assert set(dm.split_ids["train"]) | set(dm.split_ids["val"]) == set(dm.bags)
