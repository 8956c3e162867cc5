"""The crops of a DLMI folder as bags: what every datamodule of DLMI patients reads, whether
it feeds the crops to a model (`PatientBagDataModule`) or their features
(`lympho_mil.features.CachedFeatureDataModule`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lympho_mil.data.clinical import FEATURE_NAMES
from lympho_mil.data.dataset import Bag
from lympho_mil.data.dlmi import read_dlmi
from lympho_mil.data.errors import DataError
from lympho_mil.data.image_cache import ImageCache
from lympho_mil.data.settings import CropSettings


class DLMICrops:
    """The patients of the DLMI folder ``root`` (2021 or 2024 layout) as bags whose rows index
    one decoded-crop cache (`lympho_mil.data.image_cache`), made as ``crops`` says; the
    clinical vector ``[age at reference_date, log lymph count, sex_male]``."""

    def __init__(self, root: str, crops: CropSettings, reference_date: str) -> None:
        self.root = Path(root).expanduser()
        self.crops = crops
        self.reference_date = reference_date
        self.paths: list[Path] = []  # by cache row, once `load_bags` has run

    def input_settings(self) -> dict[str, Any]:
        """What a model trained on these crops depends on (see
        `BagDataModule.input_settings`)."""
        return {
            "image_size": self.crops.image_size,
            "center_crop": self.crops.center_crop,
            "mean": list(self.crops.mean),
            "std": list(self.crops.std),
            "reference_date": self.reference_date,
        }

    def load_bags(self) -> list[Bag]:
        """Every patient of the folder as a bag, no decoding."""
        frame, records = read_dlmi(self.root, self.reference_date)
        features = frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float32)
        bags, self.paths, start = [], [], 0
        for record, tabular in zip(records, features, strict=True):
            n = len(record.files)
            rows = np.arange(start, start + n, dtype=np.int64)
            bags.append(Bag(record.patient_id, record.label, rows, record.files, tabular))
            self.paths.extend(record.paths)
            start += n
        return bags

    def build_store(self, bags: Sequence[Bag]) -> tuple[ImageCache, list[Bag]]:
        """The decoded-crop cache (built on first use) and the bags without their unreadable
        crops (``skip_bad_images``); `DataError` for a patient left without any."""
        crops = self.crops
        cache = ImageCache.build_or_load(
            self.paths, crops.spec, crops.cache_dir, crops.skip_bad_images
        )
        if not cache.bad:
            return cache, list(bags)
        bad = np.asarray(cache.bad)
        usable = []
        for bag in bags:
            keep = ~np.isin(bag.rows, bad)
            if not keep.any():
                raise DataError(f"patient {bag.bag_id}: no readable image left")
            ids = tuple(i for i, k in zip(bag.instance_ids, keep, strict=True) if k)
            usable.append(Bag(bag.bag_id, bag.label, bag.rows[keep], ids, bag.tabular))
        return cache, usable
