"""Generic bag sources: bags of feature vectors or small images that are not DLMI patients.

A source is a `FeatureBags`: one instance array ``features[M, ...]`` and bags whose
``rows`` index it. Readers cover the classic MIL benchmarks of Andrews et al. (2003) in
their MATLAB and CSV forms (Musk1/2, Fox, Tiger, Elephant, ...) and MNIST-bags built from
the IDX files as in Ilse et al. (2018). `FeatureBagDataModule` and
`MNISTBagsDataModule` feed them to the same models, Trainer and split policy as the
patient bags. These bags carry no clinical vector (``tabular`` of length 0).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse

from lympho_mil.arguments import SettingError, as_settings
from lympho_mil.data.datamodule import BagDataModule
from lympho_mil.data.dataset import Bag, InstanceStore, InstanceTransform
from lympho_mil.data.errors import DataError
from lympho_mil.data.scaled import ScaledFeatures
from lympho_mil.data.settings import SplitSettings
from lympho_mil.data.transforms import FeatureScaling, FeaturesToTensor

NO_TABULAR = np.zeros(0, dtype=np.float32)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the MNIST training set, in [0, 1]
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class FeatureBags:
    """Bags over one instance array: ``features[M, ...]`` (float32) and ``bags`` indexing it."""

    features: np.ndarray
    bags: list[Bag]

    @property
    def labels(self) -> np.ndarray:
        """int[n_bags]: the bag labels (0/1)."""
        return np.array([b.label for b in self.bags])


def bags_from_arrays(
    features: Any, bag_ids: Sequence[Any] | np.ndarray, labels: Any
) -> FeatureBags:
    """Group instances into bags: ``features[M, ...]``, ``bag_ids[M]``, instance ``labels[M]``.

    Labels are 0/1 or -1/+1 per instance; a bag is positive when any of its instances is
    (bags come in order of first appearance, ids as strings; instance ids are the row
    numbers). Dense or scipy-sparse features are accepted and stored as float32. Raises
    `DataError` on arrays of different lengths, other label values, or a feature
    column that encodes the label (see `check_label_leak`).
    """
    x = features.toarray() if scipy.sparse.issparse(features) else np.asarray(features)
    x = x.astype(np.float32)
    ids = np.asarray(bag_ids).ravel()
    y = binary_labels(labels)
    if not len(x) == len(ids) == len(y):
        raise DataError(f"{len(x)} instances but {len(ids)} bag ids and {len(y)} labels")
    check_label_leak(x, y)
    order, uniques, first = _group(ids)
    bags = []
    for k in np.argsort(first, kind="stable"):
        rows = order[k]
        bags.append(
            Bag(_id_text(uniques[k]), int(y[rows].max()), rows, tuple(map(str, rows)), NO_TABULAR)
        )
    return FeatureBags(x, bags)


def _group(ids: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Rows of each distinct id (in row order), the ids, and each id's first row."""
    uniques, inverse = np.unique(ids, return_inverse=True)
    sort = np.argsort(inverse, kind="stable")
    rows = np.split(sort, np.cumsum(np.bincount(inverse))[:-1])
    return rows, uniques, np.array([r[0] for r in rows])


def _id_text(value: Any) -> str:
    """``3.0`` -> ``"3"``; anything else as ``str``."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def binary_labels(labels: Any) -> np.ndarray:
    """0/1 or -1/+1 labels (a sequence, dense or scipy-sparse array) -> int64 0/1; anything
    else raises `DataError`."""
    y = np.asarray(labels.toarray() if scipy.sparse.issparse(labels) else labels).ravel()
    values = set(np.unique(y).tolist())
    if values <= {0, 1}:
        return y.astype(np.int64)
    if values <= {-1, 1}:
        return (y > 0).astype(np.int64)
    raise DataError(f"labels must be 0/1 or -1/+1, got values {sorted(values)[:10]}")


def check_label_leak(features: np.ndarray, labels: np.ndarray) -> None:
    """Refuse features in which one column alone gives the label.

    Some public copies of the MIL benchmarks carry the instance label as an extra last
    feature column (Musk1 with 167 columns instead of 166): a column constant within each
    class and different between them. Any model would read the answer off it.
    """
    if len(np.unique(labels)) < 2:
        return
    x = features.reshape(len(features), -1)
    pos, neg = x[labels == 1], x[labels == 0]
    constant = (pos.min(0) == pos.max(0)) & (neg.min(0) == neg.max(0))
    leaks = np.flatnonzero(constant & (pos[0] != neg[0]))
    if len(leaks):
        raise DataError(
            f"feature column(s) {leaks.tolist()} (0-based, of {x.shape[1]}) equal the label "
            "under a relabelling: this copy of the data carries the answer as a feature "
            "(a known defect of some public MIL files); drop the column(s)"
        )


def read_mil_mat(path: str | Path) -> FeatureBags:
    """An Andrews et al. MATLAB file: ``bag_ids[1, M]``, ``labels[1, M]`` (+1/-1 per
    instance) and ``features[M, D]`` (sparse or dense)."""
    data = scipy.io.loadmat(str(path))
    missing = [k for k in ("bag_ids", "labels", "features") if k not in data]
    if missing:
        raise DataError(f"{path}: missing MATLAB variable(s) {missing}")
    return _with_context(path, data["features"], data["bag_ids"], data["labels"])


def read_mil_csv(path: str | Path) -> FeatureBags:
    """A header-less CSV, one instance per row: label (0/1 or -1/+1), bag id, features..."""
    frame = pd.read_csv(path, header=None, converters={1: str})  # bag ids exactly as written
    if frame.shape[1] < 3:
        raise DataError(f"{path}: need columns label, bag id, features...; got {frame.shape[1]}")
    features = frame.iloc[:, 2:]
    if not all(pd.api.types.is_numeric_dtype(t) for t in features.dtypes):
        raise DataError(f"{path}: non-numeric feature values (a header row?)")
    return _with_context(path, features.to_numpy(), frame.iloc[:, 1], frame.iloc[:, 0])


def read_mil_file(path: str | Path) -> FeatureBags:
    """`read_mil_mat` for ``.mat`` files, `read_mil_csv` for ``.csv``.

    ``.mat``: variables ``bag_ids[1, M]``, ``labels[1, M]`` (+1/-1 per instance) and
    ``features[M, D]`` (sparse or dense). ``.csv``: no header, one instance per row: label (0/1
    or -1/+1), bag id, then the features. Raises `DataError` for another suffix or a
    malformed file.
    """
    readers = {".mat": read_mil_mat, ".csv": read_mil_csv}
    suffix = Path(path).suffix.lower()
    if suffix not in readers:
        raise DataError(f"{path}: unknown MIL file type {suffix!r}; expected .mat or .csv")
    return readers[suffix](path)


def _with_context(path: str | Path, features: Any, bag_ids: Any, labels: Any) -> FeatureBags:
    try:
        return bags_from_arrays(features, np.asarray(bag_ids).ravel(), labels)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format), gzipped or not, as a numpy array of its dims."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file")
    ndim, start = data[3], 4 + 4 * data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    if len(data) - start != math.prod(dims) * dtype.itemsize:
        raise DataError(f"{path}: {len(data) - start} data bytes do not fit dims {dims}")
    return np.frombuffer(data, dtype, offset=start).reshape(dims).astype(dtype.newbyteorder("="))


def mnist_bags(
    images: np.ndarray,
    digits: np.ndarray,
    n_train_bags: int,
    n_test_bags: int = 1000,
    bag_length_mean: float = 10.0,
    bag_length_var: float = 2.0,
    target_digit: int = 9,
    train_pool: int = 5000,
    seed: int = 0,
) -> FeatureBags:
    """MNIST-bags (Ilse et al., 2018): a bag is positive when it holds ``target_digit``.

    Bag lengths are ``round(Normal(mean, var))`` clipped to >= 1 (``var`` is the variance;
    the authors' code passed it as the standard deviation). Training bags ``train0000, ...``
    draw from the first ``train_pool`` images, test bags ``test0000, ...`` from the rest,
    each without repetition inside a bag. Test bags depend on ``seed`` only, not on
    ``n_train_bags``. ``images[M, 28, 28]`` uint8 -> ``features[M, 1, 28, 28]`` in [0, 1].
    """
    if not 0 < train_pool < len(images):
        raise SettingError(f"train_pool must be in (0, {len(images)}), got {train_pool}")
    is_target = np.asarray(digits) == target_digit
    bags = []
    pools = {"train": np.arange(train_pool), "test": np.arange(train_pool, len(images))}
    for stream, (split, n_bags) in enumerate((("train", n_train_bags), ("test", n_test_bags))):
        rng = np.random.default_rng([seed, stream])
        lengths = rng.normal(bag_length_mean, math.sqrt(bag_length_var), n_bags)
        lengths = np.clip(np.rint(lengths), 1, len(pools[split])).astype(int)
        for i, n in enumerate(lengths):
            rows = np.sort(rng.choice(pools[split], size=n, replace=False))
            label = int(is_target[rows].any())
            bags.append(Bag(f"{split}{i:04d}", label, rows, tuple(map(str, rows)), NO_TABULAR))
    features = (np.asarray(images, dtype=np.float32) / 255.0)[:, None]
    return FeatureBags(features, bags)


def read_mnist_bags(
    root: str | Path,
    images: str = "t10k-images-idx3-ubyte.gz",
    labels: str = "t10k-labels-idx1-ubyte.gz",
    **kwargs: Any,
) -> FeatureBags:
    """`mnist_bags` from the IDX files in ``root`` (default: the MNIST test set).

    Args:
        root: folder of the IDX files (gzipped or not).
        images, labels: file names of the images and the digit labels.
        **kwargs: the bag settings of `mnist_bags`: ``n_train_bags`` (required),
            ``n_test_bags``, ``bag_length_mean``, ``bag_length_var``, ``target_digit``,
            ``train_pool``, ``seed``.
    """
    root = Path(root)
    pixels, digits = read_idx(root / images), read_idx(root / labels)
    if pixels.ndim != 3 or len(pixels) != len(digits):
        raise DataError(f"{root}: {pixels.shape} images do not match {digits.shape} labels")
    return mnist_bags(pixels, digits, **kwargs)


class FeatureBagDataModule(ScaledFeatures, BagDataModule):
    """Bags of a classic MIL file (``.mat`` or ``.csv``, see `read_mil_file`).

    Instances are ``float[n, D]`` vectors (``in_dim`` = D), standardised per feature with
    means and scales of the *training* bags' instances, after clipping every feature to the
    range seen in training: in sparse features (Elephant) a value never seen in training
    would otherwise reach ``|z|`` in the thousands. The standardisation is saved in
    checkpoints (`ScaledFeatures`), so ``predict`` under other splits scales as in
    training. Models take ``encoder="mlp"`` or ``"identity"`` with ``in_dim``.

    Args:
        path: the data file.
        standardize: clip to the training range and z-score with training statistics.
        noise_std: Gaussian noise added to training instances (after standardisation).
        **kwargs: split and loader settings of `BagDataModule`.
    """

    def __init__(
        self, path: str, standardize: bool = True, noise_std: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.standardize = standardize
        self.noise_std = noise_std
        self._features = np.zeros((0, 0), np.float32)
        self.scaling: FeatureScaling | None = None  # fitted on training bags, or a checkpoint's
        self._store: np.ndarray | None = None

    def input_settings(self) -> dict[str, Any]:
        return {
            **super().input_settings(),
            "instances": type(self).__name__,
            "standardize": self.standardize,
        }

    def read_source(self) -> FeatureBags:
        """The bags and their instances (override for another kind of source)."""
        return read_mil_file(self.path)

    def load_bags(self) -> list[Bag]:
        source = self.read_source()
        self._features = source.features
        return source.bags

    @property
    def instance_shape(self) -> tuple[int, ...]:
        """Shape of one instance: ``(D,)`` for vectors, ``(1, 28, 28)`` for MNIST digits."""
        _ = self.bags
        return tuple(self._features.shape[1:])

    @property
    def in_dim(self) -> int:
        """D, the feature size, for ``encoder="mlp"`` or ``"identity"``."""
        return math.prod(self.instance_shape)

    def build_store(self, bags: Sequence[Bag]) -> tuple[InstanceStore, list[Bag]]:
        if not self.standardize:
            return self._features, list(bags)
        if self._store is not None:  # one array for every stage: load_state_dict updates it
            return self._store, list(bags)
        train = self.training_patients()  # none in data to predict alone: the checkpoint's
        if self.scaling is None and train:
            rows = np.concatenate([self.bags[i].rows for i in train])
            flat = self._features.reshape(len(self._features), -1)
            self.scaling = FeatureScaling.fit(flat[rows])  # constant features keep scale 1
        self._store = self._scaled()
        return self._store, list(bags)

    def _scaled(self) -> np.ndarray:
        """A copy of the instances under ``scaling`` (as they are while there is none: no
        training bags, a checkpoint's arrives later, see `load_state_dict`)."""
        if self.scaling is None:
            return self._features.astype(np.float32)
        flat = self._features.reshape(len(self._features), -1)
        return self.scaling(flat).astype(np.float32).reshape(self._features.shape)

    def scaled_size(self) -> int:
        return self.in_dim

    def use_scaling(self, scaling: FeatureScaling) -> None:
        if self._store is not None and self.standardize:
            self._store[...] = self._scaled()  # in place: the datasets hold this array

    def instance_transform(self, stage: str) -> InstanceTransform:
        return FeaturesToTensor(self.noise_std if stage == "train" else 0.0)


@dataclass(frozen=True)
class MNISTBagSettings:
    """How MNIST-bags are drawn (``bags:`` of `MNISTBagsDataModule`'s config; see
    `mnist_bags`).

    n_train_bags, n_test_bags: bags drawn for training and for testing.
    bag_length_mean, bag_length_var: bag lengths are ``round(Normal(mean, var))`` (``var``
        the variance), at least 1.
    target_digit: a bag is positive when it holds this digit.
    train_pool: training bags draw from the first ``train_pool`` images of the file, test
        bags from the rest.
    seed: seed of the bag draw.
    """

    n_train_bags: int = 200
    n_test_bags: int = 1000
    bag_length_mean: float = 10.0
    bag_length_var: float = 2.0
    target_digit: int = 9
    train_pool: int = 5000
    seed: int = 0


class MNISTBagsDataModule(FeatureBagDataModule):
    """MNIST-bags (see `mnist_bags`): train on ``train*`` bags, test on ``test*`` bags.

    Instances are ``float[n, 1, 28, 28]`` digits, in [0, 1] or, with ``normalize`` (the
    default), shifted and scaled by the usual MNIST pixel mean and standard deviation
    (``MNIST_MEAN``, ``MNIST_STD``: fixed constants, nothing fitted on the bags); models take
    the ``lenet`` encoder.
    By default there is no validation split (``val_bags`` moves the last training bags there)
    and training runs for a fixed number of epochs; ``predict`` covers the test bags.

    Args:
        root: folder of the IDX files.
        bags: how the bags are drawn (`MNISTBagSettings`).
        val_bags: training bags held out for validation. They are drawn from the same
            image pool as the training bags, so some of their digits also sit in training
            bags (as in Ilse et al.'s protocol): validation scores read a little optimistic;
            the test bags share no image with them.
        normalize: ``(pixel - MNIST_MEAN) / MNIST_STD`` on every image.
        standardize, noise_std: as `FeatureBagDataModule`.
        split, predict_ids: explicit ids, where given, replace the default ones.
        **kwargs: loader settings of `BagDataModule` (``loader``, ``seed``, ...).
    """

    def __init__(
        self,
        root: str,
        bags: MNISTBagSettings = MNISTBagSettings(),
        val_bags: int = 0,
        normalize: bool = True,
        standardize: bool = False,
        noise_std: float = 0.0,
        split: SplitSettings = SplitSettings(),
        predict_ids: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        draw = as_settings(MNISTBagSettings, bags)
        if not 0 <= val_bags < draw.n_train_bags:
            raise SettingError(f"val_bags must be in [0, {draw.n_train_bags}), got {val_bags}")
        train = [f"train{i:04d}" for i in range(draw.n_train_bags)]
        test = [f"test{i:04d}" for i in range(draw.n_test_bags)]
        split = as_settings(SplitSettings, split)
        keep = draw.n_train_bags - val_bags
        split = dataclasses.replace(
            split,
            train_ids=train[:keep] if split.train_ids is None else split.train_ids,
            val_ids=train[keep:] if split.val_ids is None else split.val_ids,
            test_ids=test if split.test_ids is None else split.test_ids,
        )
        super().__init__(
            path=root,
            standardize=standardize,
            noise_std=noise_std,
            split=split,
            predict_ids=test if predict_ids is None else predict_ids,
            **kwargs,
        )
        self.normalize = normalize
        self.mnist_settings = dataclasses.asdict(draw)

    def read_source(self) -> FeatureBags:
        source = read_mnist_bags(self.path, **self.mnist_settings)
        if not self.normalize:
            return source
        return FeatureBags((source.features - MNIST_MEAN) / MNIST_STD, source.bags)
