"""Bags as rows of an instance store, and the torch Dataset that yields them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lympho_mil.data.batch import BagSample


class InstanceStore(Protocol):
    """Anything indexable by an int64 row array: a numpy array, a memmap, an ImageCache."""

    def __getitem__(self, rows: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Bag:
    """One patient: its label, its rows in the instance store and its clinical vector."""

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


class BagDataset(Dataset[BagSample]):
    """Yields :class:`BagSample` s; with ``max_instances`` a fresh random subset each access.

    The subset is drawn from torch's RNG, which Lightning seeds per worker, so runs repeat
    under ``seed_everything(..., workers=True)``.
    """

    def __init__(
        self,
        bags: Sequence[Bag],
        store: InstanceStore,
        to_tensor: Callable[[np.ndarray], Tensor],
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

    def __getitem__(self, index: int) -> BagSample:
        bag = self.bags[index]
        keep = np.arange(len(bag.rows))
        if self.max_instances is not None and len(keep) > self.max_instances:
            keep = np.sort(torch.randperm(len(keep))[: self.max_instances].numpy())
        return BagSample(
            instances=self.to_tensor(self.store[bag.rows[keep]]),
            tabular=torch.tensor(bag.tabular, dtype=torch.float32),
            label=float(bag.label),
            bag_id=bag.bag_id,
            instance_id=[bag.instance_ids[i] for i in keep],
        )

    @property
    def labels(self) -> np.ndarray:
        return np.array([b.label for b in self.bags])
