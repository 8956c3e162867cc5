"""Bags as rows of an instance store, and the torch Dataset that yields them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lympho_mil.data.batch import BagSample


class InstanceStore(Protocol):
    """Anything indexable by an int64 row array: a numpy array, a memmap, an ImageCache."""

    def __getitem__(self, rows: np.ndarray) -> np.ndarray: ...


class RowNumbers:
    """A store that yields the row numbers it is asked for: for loaders that ship rows and let
    the training device gather the instances (``PatientBagDataModule(cache_on_device=True)``).
    """

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return rows


@dataclass(frozen=True)
class Bag:
    """One patient: its label, its rows in the instance store and its clinical vector.

    ``label`` is 1, 0 or -1 (unknown); ``rows`` (int) index the instance store, one per
    entry of ``instance_ids``; ``tabular`` is the clinical vector ``float32[T]`` (``T = 0``
    for sources without one). Raises ValueError for an empty bag or ``rows`` and
    ``instance_ids`` of different lengths.
    """

    bag_id: str
    label: int
    rows: np.ndarray
    instance_ids: tuple[str, ...]
    tabular: np.ndarray

    def __post_init__(self) -> None:
        if len(self.rows) == 0:
            raise ValueError(f"bag {self.bag_id} is empty")
        if len(self.rows) != len(self.instance_ids):
            raise ValueError(
                f"bag {self.bag_id}: {len(self.rows)} rows but "
                f"{len(self.instance_ids)} instance ids"
            )


InstanceTransform = Callable[[np.ndarray, np.random.Generator], Tensor]
"""Store rows -> tensor; draws any randomness (augmentation) from the generator it is given."""


class BagDataset(Dataset[BagSample]):
    """Yields `BagSample` s; with ``max_instances`` a random subset of each bag.

    Indexing with ``(index, seed)`` (what `EpochSeededSampler` yields) makes every
    random choice of that access (the subset, the augmentation) a function of ``seed`` alone,
    so a run resumed from a checkpoint sees exactly the bags an uninterrupted run would. A plain
    ``index`` draws the seed from torch's RNG.

    Args:
        bags: the bags of this split.
        store: the instance store their ``rows`` index.
        to_tensor: store rows and the access's generator -> the bag's instance tensor.
        max_instances: random subset size per access (None: whole bags); >= 1.
    """

    def __init__(
        self,
        bags: Sequence[Bag],
        store: InstanceStore,
        to_tensor: InstanceTransform,
        max_instances: int | None = None,
    ) -> None:
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be >= 1 or None, got {max_instances}")
        self.bags = list(bags)
        self.store = store
        self.to_tensor = to_tensor
        self.max_instances = max_instances

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, key: int | tuple[int, int]) -> BagSample:
        if isinstance(key, tuple):
            index, seed = key
        else:
            index, seed = key, int(torch.randint(0, 2**31 - 1, ()).item())
        rng = np.random.default_rng(seed)
        bag = self.bags[index]
        keep = np.arange(len(bag.rows))
        if self.max_instances is not None and len(keep) > self.max_instances:
            keep = np.sort(rng.choice(len(keep), self.max_instances, replace=False))
        return BagSample(
            instances=self.to_tensor(self.store[bag.rows[keep]], rng),
            tabular=torch.tensor(bag.tabular, dtype=torch.float32),
            label=float(bag.label),
            bag_id=bag.bag_id,
            instance_id=[bag.instance_ids[i] for i in keep],
        )

    @property
    def labels(self) -> np.ndarray:
        """int[n_bags]: the bag labels."""
        return np.array([b.label for b in self.bags])


class EpochSeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, seed)`` pairs whose order and seeds depend only on ``(seed, epoch)``.

    Lightning calls `set_epoch` before every epoch, so the data randomness of epoch
    ``e`` is the same whether the run was interrupted and resumed or not (served by an
    `EpochLoader`, which draws from the sampler only once the epoch is set).
    """

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator) if self.shuffle else range(self.n)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=generator)
        return iter(zip([int(i) for i in order], seeds.tolist(), strict=True))


class EpochLoader(DataLoader):
    """A DataLoader that draws from its sampler at the first batch asked for, not at ``iter()``.

    Lightning creates a resumed run's training iterator before it calls the sampler's
    ``set_epoch``, and keeps it for the first epoch; a loader with workers draws its first
    indices as its iterator is created, so that epoch would replay the order and bag seeds of
    the sampler's earlier epoch. Starting at the first ``next`` draws after ``set_epoch``,
    as an uninterrupted run does (and costs nothing: the two calls follow each other).
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # any iterator will do
        return _StartsOnFirstNext(super().__iter__)


class _StartsOnFirstNext(Iterator[Any]):
    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self.start = start
        self.iterator: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.start()
        return next(self.iterator)
