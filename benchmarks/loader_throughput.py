"""Crops per second of the training loader: decoded-crop cache vs decoding every JPEG.

    python benchmarks/loader_throughput.py [--data DLMI_FOLDER] [--sizes 64,224]
        [--augment none,cpu,gpu,albumentations] [--repeats 5] [--workers 0] [--stages]

Both loaders are the same ``PatientBagDataModule`` training loader (same bags, same random
subsets of ``--max-instances`` crops, same transform); only the store behind the rows
differs: the warm memory-mapped cache, or a naive store that opens, decodes and resizes
every JPEG with PIL on every access (as the original study's per-crop loader did). Passes
alternate between the two; one JSON line per (image size, augmentation) gives the medians
and their ratio. ``--augment``: ``none``, ``cpu`` (``augment=True``, the default pipeline:
:class:`~lympho_mil.data.transforms.BagAugment` then normalisation, in the loader) or ``gpu``
(the loader only slices uint8 crops; augmentation and normalisation run later on the device
and are not part of this figure); ``albumentations`` (opt-in, for comparison) runs the same
steps as :func:`~lympho_mil.data.transforms.train_augmentation` crop by crop, the default
before ``BagAugment``. One torch and one OpenCV thread: figures per core. ``--stages`` adds,
per image size, one ``loader_stages`` line: the median microseconds per crop of each step of
one batch (the first ``--batch-size`` training bags, ``--max-instances`` crops each): naive
decoding, slicing the cache, ``BagToTensor`` alone, ``BagAugment`` alone, the albumentations
steps alone, and ``collate_bags`` padding the float crops into one batch.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from speed_common import emit, parser

from lympho_mil.data import PatientBagDataModule, collate_bags
from lympho_mil.data.image_cache import CropSpec, decode_crop
from lympho_mil.data.transforms import BagAugment, BagToTensor, train_augmentation

AUGMENT = {"none": False, "cpu": True, "gpu": "gpu", "albumentations": True}


class NaiveStore:
    """Rows -> uint8[n, S, S, 3], decoding each file with PIL on every access."""

    def __init__(self, paths: list[Path], spec: CropSpec) -> None:
        self.paths, self.spec = paths, spec

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([decode_crop(self.paths[r], self.spec) for r in rows])


def row_paths(dm: PatientBagDataModule) -> list[Path]:
    """The file behind every row of the datamodule's store."""
    paths: dict[int, Path] = {}
    for bag in dm.bags.values():
        paths.update(zip(bag.rows.tolist(), dm.instance_paths(bag.bag_id), strict=True))
    return [paths[r] for r in range(len(paths))]


def one_pass(dm: PatientBagDataModule) -> tuple[int, float]:
    """Crops delivered and seconds for one pass over the training loader."""
    start = time.perf_counter()
    crops = sum(int(batch.mask.sum()) for batch in dm.train_dataloader())
    return crops, time.perf_counter() - start


def stage_costs(dm: PatientBagDataModule, repeats: int) -> dict[str, float]:
    """Median microseconds per crop of each loader step on one batch of training bags."""
    dataset, rng = dm.datasets["train"], np.random.default_rng(0)
    bags = dataset.bags[: dm.batch_size]
    rows = [bag.rows[: dm.max_instances] for bag in bags]
    naive = NaiveStore(row_paths(dm), dm.crop_spec)
    crops = [dataset.store[r] for r in rows]
    to_tensor = BagToTensor(None, dm.mean, dm.std)
    samples = [  # float crops, whatever the loader's own transform
        dataclasses.replace(dataset[(i, 0)], instances=to_tensor(c, rng))
        for i, c in enumerate(crops)
    ]
    augment = BagAugment(affine=dm.affine, color_jitter=dm.color_jitter)
    per_crop = BagToTensor(train_augmentation(affine=dm.affine, color_jitter=dm.color_jitter))
    steps = {
        "naive_decode": lambda: [naive[r] for r in rows],
        "slice_cache": lambda: [dataset.store[r] for r in rows],
        "to_tensor": lambda: [to_tensor(c, rng) for c in crops],
        "bag_augment": lambda: [augment(c, rng) for c in crops],
        "albumentations": lambda: [per_crop.augment(c, rng) for c in crops],
        "collate": lambda: collate_bags(samples),
    }
    n = sum(len(r) for r in rows)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) / n * 1e6)
    return {f"{name}_us": round(statistics.median(t), 1) for name, t in times.items()}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,224", help="image sizes, comma-separated")
    p.add_argument("--augment", default="none,cpu,gpu", help="of none,cpu,gpu,albumentations")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-instances", type=int, default=24)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stages", action="store_true", help="also time each loader step")
    args = p.parse_args()
    torch.set_num_threads(1)  # the loader's work is per crop; keep the comparison per core
    cv2.setNumThreads(1)
    for size in map(int, args.sizes.split(",")):
        for augment in args.augment.split(","):
            dm = PatientBagDataModule(
                str(args.data),
                image_size=size,
                cache_dir=args.cache_dir,
                augment=AUGMENT[augment],
                batch_size=args.batch_size,
                max_instances=args.max_instances,
                num_workers=args.workers,
            )
            start = time.perf_counter()
            dm.setup("fit")  # decodes into the cache once if it is cold
            setup_s = time.perf_counter() - start
            dataset = dm.datasets["train"]
            if augment == "albumentations":
                steps = train_augmentation(affine=dm.affine, color_jitter=dm.color_jitter)
                dataset.to_tensor = BagToTensor(steps, dm.mean, dm.std)
            cached, naive = dataset.store, NaiveStore(row_paths(dm), dm.crop_spec)
            rates: dict[str, list[float]] = {"cached": [], "naive": []}
            for _ in range(args.repeats):
                for name, store in (("cached", cached), ("naive", naive)):
                    dataset.store = store
                    crops, seconds = one_pass(dm)
                    rates[name].append(crops / seconds)
            dataset.store = cached
            cached_rate = statistics.median(rates["cached"])
            naive_rate = statistics.median(rates["naive"])
            emit(
                "loader_throughput",
                image_size=size,
                augment=augment,
                workers=args.workers,
                crops_per_pass=crops,
                repeats=args.repeats,
                cached_crops_per_s=round(cached_rate, 1),
                naive_crops_per_s=round(naive_rate, 1),
                ratio=round(cached_rate / naive_rate, 2),
                setup_s=round(setup_s, 2),
            )
        if args.stages:
            emit("loader_stages", image_size=size, **stage_costs(dm, args.repeats))


if __name__ == "__main__":
    main()
