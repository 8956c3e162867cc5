"""The batch contract: the one structure every loader yields and every model reads.

``B`` is the number of bags (patients) in the batch, ``N`` the size of the largest bag in
it (smaller bags are padded), ``T`` the length of the clinical vector (0 when a dataset has
none).

=============  ==================================  =========================================
field          type / shape                        meaning
=============  ==================================  =========================================
instances      float[B, N, C, H, W] or [B, N, D]   crops (images) or precomputed features
mask           bool[B, N]                          True where an instance is real
tabular        float[B, T]                         clinical vector (age, log count, sex, ...)
                                                   *not* standardised: each model carries the
                                                   standardisation fitted on its training
                                                   patients, so a checkpoint predicts alone
label          float[B]                            1 tumoral, 0 reactive, -1 unknown
bag_id         list[str] (B)                       patient ids
instance_id    list[list[str]] (B x n_b)           crop file names of the real instances
=============  ==================================  =========================================

One exception, on the way to the device only: with ``PatientBagDataModule(augment="gpu")``
the *training* loader yields ``instances`` as raw pixels ``uint8[B, N, H, W, C]`` (channels
last, as cached: a quarter of the bytes to copy, no channel split), or with
``cache_on_device=True`` as row numbers ``int64[B, N]`` into the decoded-crop cache held on the
device, and that datamodule's ``on_after_batch_transfer`` hook gathers the pixels, moves the
channels, augments and normalises them on the device. Models therefore always receive float
instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class BagSample:
    """One bag before collation: ``instances[n, ...]``, ``tabular[T]``."""

    instances: Tensor
    tabular: Tensor
    label: float
    bag_id: str
    instance_id: list[str]


@dataclass
class BagBatch:
    """A padded, masked batch of ``B`` bags, each padded to the largest one (``N`` instances).

    Attributes:
        instances: float[B, N, C, H, W] crops or float[B, N, D] features, zeros on padding
            (before the device hook of ``PatientBagDataModule(augment="gpu")``: raw
            uint8[B, N, H, W, C] pixels, or int64[B, N] rows with ``cache_on_device``).
        mask: bool[B, N], True where an instance is real.
        tabular: float[B, T], the clinical vector, *not* standardised (each model carries
            the standardisation fitted on its training patients).
        label: float[B]: 1 tumoral, 0 reactive, -1 unknown.
        bag_id: the B patient (bag) ids.
        instance_id: per bag, the ids of its real instances (crop file names for DLMI).
    """

    instances: Tensor
    mask: Tensor
    tabular: Tensor
    label: Tensor
    bag_id: list[str]
    instance_id: list[list[str]]

    def __len__(self) -> int:
        return len(self.bag_id)

    @property
    def bag_sizes(self) -> Tensor:
        """long[B]: number of real instances per bag."""
        return self.mask.sum(dim=1)

    def pin_memory(self) -> BagBatch:
        """Called by ``DataLoader(pin_memory=True)`` in the worker's pinning thread."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> BagBatch:
        """Copy to ``device``; on CUDA non-blocking by default, so copies from pinned memory
        overlap with compute (Lightning calls this with the device alone)."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, fn: Any) -> BagBatch:
        return BagBatch(
            instances=fn(self.instances),
            mask=fn(self.mask),
            tabular=fn(self.tabular),
            label=fn(self.label),
            bag_id=self.bag_id,
            instance_id=self.instance_id,
        )


def collate_bags(samples: Sequence[BagSample]) -> BagBatch:
    """Pad bags to the largest one in the batch and build the mask.

    Padding is zeros; models must never let padded positions change their output. The
    instances keep their dtype; ``tabular`` becomes float32, ``label`` float32.

    Raises:
        ValueError: ``samples`` is empty, or its bags' instances differ in shape past the
            first dimension.
    """
    if not samples:
        raise ValueError("collate_bags needs at least one bag")
    sizes = [s.instances.shape[0] for s in samples]
    n_max = max(sizes)
    first = samples[0].instances
    odd = [s.bag_id for s in samples if s.instances.shape[1:] != first.shape[1:]]
    if odd:
        raise ValueError(
            f"bags {odd[:5]} hold instances of another shape than bag {samples[0].bag_id}'s "
            f"{tuple(first.shape[1:])}: every crop of a batch needs one size"
        )
    instances = first.new_empty((len(samples), n_max, *first.shape[1:]))
    mask = torch.zeros(len(samples), n_max, dtype=torch.bool)
    for i, (sample, n) in enumerate(zip(samples, sizes, strict=True)):
        instances[i, :n] = sample.instances
        instances[i, n:] = 0  # only the padding is zeroed: real slots are written once
        mask[i, :n] = True
    return BagBatch(
        instances=instances,
        mask=mask,
        tabular=torch.stack([s.tabular for s in samples]).float(),
        label=torch.tensor([s.label for s in samples], dtype=torch.float32),
        bag_id=[s.bag_id for s in samples],
        instance_id=[list(s.instance_id) for s in samples],
    )
