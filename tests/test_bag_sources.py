"""Generic bag sources: MIL .mat/.csv readers, the label-leak check, IDX and MNIST-bags,
and the datamodules feeding them to the library's models."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse
import torch
from sklearn.metrics import roc_auc_score
from trainers import quiet_trainer

from lympho_mil.cli import main
from lympho_mil.data import BagBatch, DataError, LoaderSettings, MNISTBagSettings, SplitSettings
from lympho_mil.data.bag_sources import (
    MNIST_MEAN,
    MNIST_STD,
    FeatureBagDataModule,
    FeatureBags,
    MNISTBagsDataModule,
    bags_from_arrays,
    mnist_bags,
    read_idx,
    read_mil_csv,
    read_mil_file,
    read_mil_mat,
    read_mnist_bags,
)
from lympho_mil.models import AttentionMIL, OptimSettings
from lympho_mil.nn import EncoderSettings

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# 5 bags of 2, 3, 1, 4, 2 instances; bags 7 and 9 positive; bag ids not in row order.
BAG_IDS = np.array([3, 3, 7, 7, 7, 1, 9, 9, 9, 9, 4, 4])
BAG_LABELS = {3: 0, 7: 1, 1: 0, 9: 1, 4: 0}
D = 6


def instance_table(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``features[12, D]`` with zeros (sparse-friendly), bag ids, -1/+1 instance labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(BAG_IDS), D)) * (rng.random((len(BAG_IDS), D)) > 0.3)
    labels = np.array([1 if BAG_LABELS[b] else -1 for b in BAG_IDS])
    return x, BAG_IDS, labels


def write_mat(path: Path, x: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> Path:
    """The Andrews et al. layout: row vectors ``bag_ids``/``labels``, sparse ``features``."""
    scipy.io.savemat(
        path,
        {
            "bag_ids": ids[None].astype(np.uint8),
            "labels": scipy.sparse.csc_matrix(labels[None].astype(float)),
            "features": scipy.sparse.csc_matrix(x),
        },
    )
    return path


def write_csv(path: Path, x: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> Path:
    frame = pd.concat(
        [pd.DataFrame({"y": (labels > 0).astype(int), "bag": ids}), pd.DataFrame(x)], axis=1
    )
    frame.to_csv(path, header=False, index=False)
    return path


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """300 random 28x28 'digits' with labels 0-9 in IDX gz files (MNIST test-set names)."""
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (300, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 300))
    return tmp_path


def check_bags(source: FeatureBags, x: np.ndarray) -> None:
    assert [b.bag_id for b in source.bags] == ["3", "7", "1", "9", "4"]
    assert source.labels.tolist() == [0, 1, 0, 1, 0]
    assert [len(b.rows) for b in source.bags] == [2, 3, 1, 4, 2]
    assert source.features.shape == (12, D)
    assert source.features.dtype == np.float32
    for bag in source.bags:
        assert (BAG_IDS[bag.rows] == int(bag.bag_id)).all()
        assert bag.tabular.shape == (0,)
    np.testing.assert_allclose(source.features, x, rtol=1e-6, atol=1e-6)


def test_read_mat(tmp_path: Path) -> None:
    x, ids, labels = instance_table()
    check_bags(read_mil_mat(write_mat(tmp_path / "toy.mat", x, ids, labels)), x)


def test_read_csv(tmp_path: Path) -> None:
    x, ids, labels = instance_table()
    check_bags(read_mil_csv(write_csv(tmp_path / "toy.csv", x, ids, labels)), x)


def test_read_csv_keeps_bag_ids_as_written(tmp_path: Path) -> None:
    """'007' and '7', '1.10' and '1.1' are four bags, not two numbers."""
    ids = np.array(["007", "007", "7", "1.10", "1.1", "1.1"])
    x = np.arange(12, dtype=float).reshape(6, 2)
    bags = read_mil_csv(write_csv(tmp_path / "ids.csv", x, ids, np.ones(6)))
    assert sorted(b.bag_id for b in bags.bags) == ["007", "1.1", "1.10", "7"]


def test_read_file_dispatches_and_refuses_unknown_types(tmp_path: Path) -> None:
    x, ids, labels = instance_table()
    check_bags(read_mil_file(write_mat(tmp_path / "toy.mat", x, ids, labels)), x)
    with pytest.raises(DataError, match="unknown MIL file type"):
        read_mil_file(tmp_path / "toy.arff")


def test_csv_with_header_row_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "toy.csv"
    path.write_text("label,bag,f1\n1,1,0.5\n0,2,0.1\n")
    with pytest.raises(DataError, match="non-numeric"):
        read_mil_csv(path)


def test_bag_is_positive_when_any_instance_is() -> None:
    x = np.random.default_rng(0).normal(size=(4, 3))
    source = bags_from_arrays(x, ["a", "a", "b", "b"], [0, 1, 0, 0])
    assert source.labels.tolist() == [1, 0]


def test_bad_labels_are_refused() -> None:
    with pytest.raises(DataError, match="0/1 or -1/\\+1"):
        bags_from_arrays(np.eye(3), [1, 1, 2], [0, 1, 2])
    with pytest.raises(DataError, match="3 instances but 2 bag ids"):
        bags_from_arrays(np.eye(3), [1, 1], [0, 1, 1])


@pytest.mark.parametrize("encoding", [(0, 1), (-1, 1), (2, 1)])
def test_label_column_is_refused(tmp_path: Path, encoding: tuple[int, int]) -> None:
    """The Musk1-with-167-columns pitfall: the label as an extra last feature column."""
    x, ids, labels = instance_table()
    leaked = np.column_stack([x, np.where(labels > 0, encoding[1], encoding[0])])
    with pytest.raises(DataError, match=rf"column\(s\) \[{D}\].*carries the answer"):
        read_mil_csv(write_csv(tmp_path / "leak.csv", leaked, ids, labels))
    with pytest.raises(DataError, match=r"leak\.mat: feature column"):
        read_mil_mat(write_mat(tmp_path / "leak.mat", leaked, ids, labels))


def test_constant_column_is_no_leak() -> None:
    x, ids, labels = instance_table()
    source = bags_from_arrays(np.column_stack([x, np.ones(len(x))]), ids, labels)
    assert source.features.shape == (12, D + 1)


def test_read_idx(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / "x.idx3.gz", images))
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad.idx")


def test_mnist_bags_rule_pools_and_seed(mnist_dir: Path) -> None:
    source = read_mnist_bags(mnist_dir, n_train_bags=30, n_test_bags=20, train_pool=150, seed=1)
    digits = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    train, test = source.bags[:30], source.bags[30:]
    assert [b.bag_id for b in train[:2]] == ["train0000", "train0001"]
    assert len(test) == 20 and test[0].bag_id == "test0000"
    assert source.features.shape == (300, 1, 28, 28)
    assert source.features.min() >= 0.0 and source.features.max() <= 1.0
    for bag in source.bags:
        assert bag.label == int((digits[bag.rows] == 9).any())
        assert len(set(bag.rows.tolist())) == len(bag.rows) >= 1
    assert all(b.rows.max() < 150 for b in train)
    assert all(b.rows.min() >= 150 for b in test)
    assert 0 < source.labels.mean() < 1

    again = read_mnist_bags(mnist_dir, n_train_bags=30, n_test_bags=20, train_pool=150, seed=1)
    assert all(np.array_equal(a.rows, b.rows) for a, b in zip(source.bags, again.bags, strict=True))
    other = read_mnist_bags(mnist_dir, n_train_bags=30, n_test_bags=20, train_pool=150, seed=2)
    assert any(not np.array_equal(a.rows, b.rows) for a, b in zip(train, other.bags, strict=False))
    more = read_mnist_bags(mnist_dir, n_train_bags=50, n_test_bags=20, train_pool=150, seed=1)
    assert all(np.array_equal(a.rows, b.rows) for a, b in zip(test, more.bags[50:], strict=True))


def test_mnist_bag_lengths_follow_the_normal_law() -> None:
    images, digits = np.zeros((4000, 28, 28), np.uint8), np.zeros(4000, int)
    source = mnist_bags(
        images, digits, 2000, 0, bag_length_mean=10, bag_length_var=2, train_pool=2000
    )
    lengths = np.array([len(b.rows) for b in source.bags])
    assert abs(lengths.mean() - 10) < 0.15
    assert 1.6 < lengths.var() < 2.5  # the variance of round(N(10, 2)) is 2 + 1/12
    short = mnist_bags(images, digits, 500, 0, bag_length_mean=1, bag_length_var=4, train_pool=2000)
    assert min(len(b.rows) for b in short.bags) == 1


def test_feature_datamodule_yields_bag_batches(tmp_path: Path) -> None:
    x, ids, labels = instance_table()
    path = write_csv(tmp_path / "toy.csv", x * 10 + 5, ids, labels)
    data = FeatureBagDataModule(
        str(path),
        loader=LoaderSettings(batch_size=2),
        split=SplitSettings(train_ids=["3", "7", "9"], val_ids=["1"], test_ids=["4"]),
    )
    assert data.in_dim == D and data.tabular_dim == 0
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, BagBatch)
    assert batch.instances.shape == (2, int(batch.mask.sum(1).max()), D)
    assert batch.mask.dtype == torch.bool and batch.tabular.shape == (2, 0)
    train_rows = np.concatenate([data.bags[i].rows for i in ["3", "7", "9"]])
    store = data.datasets["train"].store
    np.testing.assert_allclose(store[train_rows].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(store[train_rows].std(0), 1.0, atol=1e-4)
    assert not np.allclose(store[data.bags["4"].rows].mean(0), 0.0, atol=1e-3)


def test_standardisation_clips_to_the_training_range(tmp_path: Path) -> None:
    """A rare sparse feature must not explode on values never seen in training."""
    x, ids, labels = instance_table()
    x[:, 0] = 0.0
    x[np.flatnonzero(BAG_IDS == 7)[0], 0] = 1e-3  # the one non-zero training value
    x[BAG_IDS == 4, 0] = 50.0  # far outside the training range
    path = write_csv(tmp_path / "sparse.csv", x, ids, labels)
    data = FeatureBagDataModule(
        str(path), split=SplitSettings(train_ids=["3", "7", "9"], val_ids=[], test_ids=["4"])
    )
    data.setup("test")
    store = data.datasets["test"].store
    train_rows = np.concatenate([data.bags[i].rows for i in ["3", "7", "9"]])
    np.testing.assert_allclose(store[data.bags["4"].rows, 0], store[train_rows, 0].max())
    assert np.abs(store).max() < 10


def test_mnist_datamodule_splits_and_shapes(mnist_dir: Path) -> None:
    data = MNISTBagsDataModule(
        str(mnist_dir),
        bags=MNISTBagSettings(n_train_bags=12, n_test_bags=5, train_pool=150),
        val_bags=2,
        loader=LoaderSettings(batch_size=3),
    )
    assert {k: len(v) for k, v in data.split_ids.items() if k != "predict"} == {
        "train": 10,
        "val": 2,
        "test": 5,
    }
    assert data.instance_shape == (1, 28, 28)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch.instances.shape[0] == 3 and batch.instances.shape[2:] == (1, 28, 28)
    assert batch.bag_id == ["test0000", "test0001", "test0002"]


def test_mnist_normalisation_uses_the_fixed_mnist_statistics(mnist_dir: Path) -> None:
    settings: dict[str, Any] = {
        "bags": MNISTBagSettings(n_train_bags=4, n_test_bags=2, train_pool=150),
        "loader": LoaderSettings(batch_size=2),
    }
    raw = MNISTBagsDataModule(str(mnist_dir), normalize=False, **settings)
    normed = MNISTBagsDataModule(str(mnist_dir), **settings)
    for data in (raw, normed):
        data.setup("test")
    batch_raw = next(iter(raw.test_dataloader()))
    batch = next(iter(normed.test_dataloader()))
    x_raw, x = batch_raw.instances[batch_raw.mask], batch.instances[batch.mask]  # no padding
    assert x_raw.min() >= 0.0 and x_raw.max() <= 1.0
    torch.testing.assert_close(x, (x_raw - MNIST_MEAN) / MNIST_STD)


def separable_bags(n_bags: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Negative bags: N(0, 1) instances; positive bags hold 1-2 instances shifted by +6."""
    rng = np.random.default_rng(seed)
    rows, ids, labels = [], [], []
    for b in range(n_bags):
        n, y = int(rng.integers(4, 9)), b % 2
        x = rng.normal(size=(n, D))
        x[: int(rng.integers(1, 3)) if y else 0, 0] += 6.0
        rows.append(x)
        ids += [b] * n
        labels += [y] * n
    return np.concatenate(rows), np.array(ids), np.array(labels)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_tiny_attention_model_learns_separable_bags(tmp_path: Path) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    x, instance_bags, labels = separable_bags(60, seed=0)
    path = write_csv(tmp_path / "sep.csv", x, instance_bags, labels)
    ids = [str(b) for b in range(60)]
    data = FeatureBagDataModule(
        str(path),
        loader=LoaderSettings(batch_size=8),
        split=SplitSettings(train_ids=ids[:40], val_ids=[], test_ids=ids[40:]),
        predict_ids=ids[40:],
    )
    L.seed_everything(0, verbose=False)
    model = AttentionMIL(
        encoder=EncoderSettings("mlp", out_dim=16, in_dim=data.in_dim),
        optim=OptimSettings(lr=1e-2),
        attention_hidden=16,
    )
    trainer = quiet_trainer(
        max_epochs=10,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    (metrics,) = trainer.test(model, data, verbose=False)
    assert metrics["test_balanced_accuracy"] >= 0.9
    # attention points at the witnesses (the shifted instances) inside unseen positive bags
    records = [r for b in trainer.predict(model, datamodule=data) for r in b if r["label"] == 1]
    witness = [bool(x[row, 0] > 3) for r in records for row in data.bags[r["id"]].rows]
    weights = [w for r in records for w in r["weights"]]
    assert roc_auc_score(witness, weights) > 0.9


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("stem", "bags", "positive", "shape"),
    [
        ("musk1norm_matlab.mat", 92, 47, (476, 166)),
        ("elephant_100x100_matlab.mat", 200, 100, (1391, 230)),
    ],
)
def test_shared_mil_files(stem: str, bags: int, positive: int, shape: tuple[int, int]) -> None:
    csv = {"musk1norm_matlab.mat": "Musk1.csv", "elephant_100x100_matlab.mat": "Elephant.csv"}
    if not (SHARED / "mil" / stem).is_file():
        pytest.skip(f"{SHARED / 'mil' / stem} is absent")
    mat, table = read_mil_file(SHARED / "mil" / stem), read_mil_file(SHARED / "mil" / csv[stem])
    for source in (mat, table):
        assert len(source.bags) == bags and source.labels.sum() == positive
        assert source.features.shape == shape
    assert [b.bag_id for b in mat.bags] == [b.bag_id for b in table.bags]
    assert mat.labels.tolist() == table.labels.tolist()


@pytest.mark.shared_data
def test_shared_mnist_bags() -> None:
    if not (SHARED / "mnist").is_dir():
        pytest.skip(f"{SHARED / 'mnist'} is absent")
    source = read_mnist_bags(SHARED / "mnist", n_train_bags=50)
    assert source.features.shape == (10000, 1, 28, 28) and len(source.bags) == 1050
    assert 0.5 < source.labels.mean() < 0.8  # P(a 9 among ~10 digits) is about 0.65


@pytest.mark.usefixtures("one_thread")
def test_cli_fits_feature_and_mnist_bags(
    tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both datamodules go through ``lympho-mil fit`` (jsonargparse reads their signatures)."""
    csv = write_csv(tmp_path / "sep.csv", *separable_bags(20, seed=0))
    monkeypatch.chdir(tmp_path)
    common = "fit --trainer.max_epochs 1 --trainer.enable_progress_bar false"
    main(
        f"{common} --data FeatureBagDataModule --data.path {csv} --model AttentionMIL "
        f"--model.encoder.name mlp --model.encoder.in_dim {D}".split()
    )
    main(
        f"{common} --data MNISTBagsDataModule --data.root {mnist_dir} --data.bags.n_train_bags 8 "
        "--data.val_bags 4 --data.bags.n_test_bags 4 --data.bags.train_pool 150 "
        "--model MeanPoolMIL --model.encoder.name lenet --model.encoder.out_dim 16".split()
    )
    assert len(list(tmp_path.glob("runs/lightning_logs/version_*/checkpoints/last.ckpt"))) == 2


def test_feature_standardisation_travels_in_the_checkpoint(tmp_path: Path) -> None:
    """Predicting under another split scales the instances as in training, once the
    checkpoint's state is loaded."""
    x, ids, labels = instance_table()
    path = str(write_csv(tmp_path / "toy.csv", x * 10 + 5, ids, labels))
    trained = FeatureBagDataModule(
        path, split=SplitSettings(train_ids=["3", "7", "9"], val_ids=["1"], test_ids=["4"])
    )
    trained.setup()
    state = trained.state_dict()
    assert set(state) == {"feature_scaling"}
    expected = trained.datasets["test"].store
    other = FeatureBagDataModule(
        path, split=SplitSettings(train_ids=["1", "9"], val_ids=["3"], test_ids=["4"])
    )
    other.setup()
    assert not np.allclose(other.datasets["test"].store, expected)  # its own split's scaling
    other.load_state_dict(state)
    for split in other.datasets:  # every dataset sees the restored scaling, in place
        np.testing.assert_allclose(other.datasets[split].store, expected, rtol=1e-6)
    raw = other._features.copy()
    other.load_state_dict(state)  # again: the raw instances are never rescaled themselves
    np.testing.assert_array_equal(other._features, raw)
    np.testing.assert_allclose(other.datasets["test"].store, expected, rtol=1e-6)
    plain = FeatureBagDataModule(
        path, standardize=False, split=SplitSettings(train_ids=["3"], val_ids=[])
    )
    plain.setup("fit")
    assert plain.state_dict() == {}
    plain.load_state_dict(state)  # a checkpoint's standardisation: not applied without it
    np.testing.assert_array_equal(plain.datasets["train"].store, plain._features)


def test_a_standardisation_of_another_feature_size_is_refused(tmp_path: Path) -> None:
    """Data of another feature size than the checkpoint's: a DataError naming both sizes (the
    model would refuse the data by name too), not a broadcasting error of numpy."""
    x, ids, labels = instance_table()
    trained = FeatureBagDataModule(
        str(write_csv(tmp_path / "a.csv", x, ids, labels)),
        split=SplitSettings(train_ids=["3", "7"], val_ids=["1"]),
    )
    trained.setup("fit")
    wider = np.concatenate([x, x[:, :2]], axis=1)
    other = FeatureBagDataModule(
        str(write_csv(tmp_path / "b.csv", wider, ids, labels)),
        split=SplitSettings(train_ids=["1"], val_ids=[]),
    )
    other.setup("fit")
    with pytest.raises(DataError, match=rf"instances of {D} values .* hold {D + 2}"):
        other.load_state_dict(trained.state_dict())


def test_data_to_predict_alone_takes_the_checkpoints_standardisation(tmp_path: Path) -> None:
    """New bags of one class only cannot be split into training bags: predict still sets up,
    unscaled until the checkpoint's standardisation arrives."""
    x, ids, labels = instance_table()
    path = str(write_csv(tmp_path / "toy.csv", x, ids, labels))
    trained = FeatureBagDataModule(
        path, split=SplitSettings(train_ids=["3", "7", "9"], val_ids=["1"])
    )
    trained.setup("fit")
    positive = [str(i) for i in np.unique(ids) if BAG_LABELS[i]]
    rows = np.isin(ids.astype(str), positive)
    new = write_csv(tmp_path / "new.csv", x[rows], ids[rows], labels[rows])
    other = FeatureBagDataModule(str(new), predict_ids=positive)
    other.setup("predict")  # no training split to fit a standardisation on
    np.testing.assert_array_equal(other.datasets["predict"].store, x[rows].astype(np.float32))
    other.load_state_dict(trained.state_dict())
    expected = trained.scaling(x[rows].astype(np.float32)).astype(np.float32)
    np.testing.assert_allclose(other.datasets["predict"].store, expected, rtol=1e-6)
