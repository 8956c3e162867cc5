"""DataModules: one base class for any source of bags, and the DLMI patient bags.

The base class owns everything that does not depend on where bags come from: the split
policy (stratified holdout, k-fold, or explicit id lists), the clinical standardisation
fitted on the training patients, datasets per stage and the loaders. A subclass only says
how to list its bags (`BagDataModule.load_bags`, cheap, no decoding) and how to read
their instances (`BagDataModule.build_store`).
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from torch.utils.data import DataLoader, Sampler

from lympho_mil.arguments import SettingError, check_positive, check_share
from lympho_mil.data.batch import BagBatch, collate_bags
from lympho_mil.data.clinical import FEATURE_NAMES, fit_standardization
from lympho_mil.data.dataset import (
    Bag,
    BagDataset,
    EpochLoader,
    EpochSeededSampler,
    InstanceStore,
    InstanceTransform,
    RowNumbers,
)
from lympho_mil.data.dlmi import read_dlmi
from lympho_mil.data.errors import DataError
from lympho_mil.data.gpu_augment import DeviceAugment, pixels_to_tensor, rows_to_tensor
from lympho_mil.data.image_cache import CropSpec, ImageCache
from lympho_mil.data.splits import holdout_split, kfold_split
from lympho_mil.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BagAugment, BagToTensor

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test", "predict")
DEVICE_COPY_ROWS = 1024  # crops per host -> device copy of cache_on_device (bounds host memory)


class BagDataModule(LightningDataModule, ABC):
    """Base class: split policy, clinical standardisation, datasets and loaders.

    Args:
        batch_size: bags per batch; bags are padded to the largest one and masked.
        max_instances: random subset size of each training bag per step (None: whole bags).
            Validation, test and predict always see whole bags.
        val_fraction: share of the labelled patients held out for validation (holdout policy);
            with ``test_fraction``, a share of those left after the test split.
        test_fraction: share held out first as a test split (0: none).
        n_folds, fold: k-fold policy instead of holdout: validate on fold ``fold``.
        seed: seed of the splits and of the data randomness (order, subsets, augmentation),
            which depends only on (seed, epoch) so resumed runs replay the same batches. A
            split depends on the seed and the order of the patients in the data (the csv
            rows); ``lympho-mil cv`` sorts them by id first.
        train_ids, val_ids, test_ids: explicit patient lists (override the policy); used by
            cross-validation.
        predict_ids: patients to predict (default: every unlabelled patient).
        num_workers, pin_memory, persistent_workers: DataLoader settings.
    """

    def __init__(
        self,
        batch_size: int = 4,
        max_instances: int | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        n_folds: int | None = None,
        fold: int = 0,
        seed: int = 0,
        train_ids: list[str] | None = None,
        val_ids: list[str] | None = None,
        test_ids: list[str] | None = None,
        predict_ids: list[str] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise SettingError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise SettingError(
                f"val_fraction must be in (0, 1), got {val_fraction}; to train without "
                "validation, pass explicit train_ids and val_ids=[]"
            )
        if not 0.0 <= test_fraction < 1.0:
            raise SettingError(f"test_fraction must be in [0, 1), got {test_fraction}")
        check_positive(max_instances=max_instances)
        if n_folds is not None and not (n_folds >= 2 and 0 <= fold < n_folds):
            raise SettingError(f"need n_folds >= 2 and 0 <= fold < n_folds, got {n_folds}, {fold}")
        if num_workers < 0:
            raise SettingError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.max_instances = max_instances
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.n_folds = n_folds
        self.fold = fold
        self.seed = seed
        self.explicit_ids = {"train": train_ids, "val": val_ids, "test": test_ids}
        self.predict_ids = predict_ids
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.datasets: dict[str, BagDataset] = {}

    # -- what a subclass provides ---------------------------------------------------------
    @abstractmethod
    def load_bags(self) -> list[Bag]:
        """Every bag of the source, labelled (0/1) and unlabelled (-1); no decoding here."""

    @abstractmethod
    def build_store(self, bags: Sequence[Bag]) -> tuple[InstanceStore, list[Bag]]:
        """The instance store behind ``Bag.rows`` and the bags that remain usable."""

    @abstractmethod
    def instance_transform(self, stage: str) -> InstanceTransform:
        """Store rows -> float tensor, for ``stage`` in `STAGES`."""

    def split_store(self, split: str, store: InstanceStore) -> InstanceStore:
        """The store the ``split`` dataset reads: ``store`` itself, unless a subclass ships
        something else (row numbers, say)."""
        return store

    feature_names: tuple[str, ...] = ()

    # -- derived, cheap, available before setup (the CLI links them into the model) --------
    @cached_property
    def bags(self) -> dict[str, Bag]:
        """Every bag of the source by id (`load_bags`, called once)."""
        bags = self.load_bags()
        return {b.bag_id: b for b in bags}

    @cached_property
    def split_ids(self) -> dict[str, list[str]]:
        """Patient ids per stage: ``train``, ``val``, ``test``, ``predict``."""
        labelled = [b for b in self.bags.values() if b.label in (0, 1)]
        ids = [b.bag_id for b in labelled]
        labels = [b.label for b in labelled]
        explicit = {k: v for k, v in self.explicit_ids.items() if v is not None}
        if explicit:
            splits = {k: list(explicit.get(k) or []) for k in ("train", "val", "test")}
            self._check_explicit(splits, set(ids))
        else:
            splits = self._policy_split(ids, labels)
        return {**splits, "predict": self.predict_split}

    @cached_property
    def predict_split(self) -> list[str]:
        """The patients to predict: ``predict_ids``, else every unlabelled patient. Apart from
        `split_ids`: a checkpoint predicts data that has no training split at all."""
        unlabelled = [b.bag_id for b in self.bags.values() if b.label == -1]
        ids = list(self.predict_ids) if self.predict_ids is not None else unlabelled
        unknown = [i for i in ids if i not in self.bags]
        if unknown:
            raise DataError(f"predict_ids not found in the data: {unknown[:10]}")
        return ids

    def _policy_split(self, ids: list[str], labels: list[int]) -> dict[str, list[str]]:
        if len(set(labels)) < 2:
            raise DataError(f"need labelled patients of both classes, got labels {set(labels)}")
        test: list[str] = []
        try:
            if self.test_fraction > 0:
                ids, test = holdout_split(ids, labels, self.test_fraction, self.seed)
                labels = [self.bags[i].label for i in ids]
            if self.n_folds is not None:
                train, val = kfold_split(ids, labels, self.n_folds, self.fold, self.seed)
            else:
                train, val = holdout_split(ids, labels, self.val_fraction, self.seed)
        except ValueError as exc:
            raise DataError(
                f"cannot split the labelled patients (test_fraction={self.test_fraction}, "
                f"val_fraction={self.val_fraction}, n_folds={self.n_folds}): {exc}; give "
                "train_ids and val_ids, or more patients"
            ) from exc
        return {"train": train, "val": val, "test": test}

    @staticmethod
    def _check_explicit(splits: dict[str, list[str]], labelled: set[str]) -> None:
        seen: dict[str, str] = {}
        for stage, ids in splits.items():
            for pid in ids:
                if pid not in labelled:
                    raise DataError(f"{stage}_ids: patient {pid} is unknown or unlabelled")
                if pid in seen:
                    raise DataError(f"patient {pid} is in both {seen[pid]}_ids and {stage}_ids")
                seen[pid] = stage
        if not splits["train"]:
            raise DataError("explicit ids given but train_ids is empty")

    def input_settings(self) -> dict[str, Any]:
        """The settings that make what a model reads (kind and shape of the instances,
        preprocessing, the clinical vector), as plain values: a model trained on other values
        would read other data. Checkpoints record them; subclasses add theirs."""
        return {"clinical": list(self.feature_names)}

    def checkpoint_record(self) -> dict[str, Any]:
        """What a checkpoint records about its data: the class, `input_settings`, and the
        training and validation patients (none for data that has no training split)."""
        try:
            train, val = self.split_ids["train"], self.split_ids["val"]
        except DataError:
            train, val = [], []
        return {
            "class": type(self).__name__,
            "settings": self.input_settings(),
            "train_ids": sorted(train),
            "val_ids": sorted(val),
        }

    @property
    def tabular_dim(self) -> int:
        """T, the length of the clinical vector."""
        return len(next(iter(self.bags.values())).tabular)

    @cached_property
    def tabular_stats(self) -> dict[str, list[float]]:
        """Means and scales of the clinical vector over the *training* patients only.

        Data without a training split (only new patients to predict) gets the identity; the
        model's checkpoint then brings the standardisation it was trained with.
        """
        train = self.training_patients()
        if not train:
            return {"mean": [0.0] * self.tabular_dim, "scale": [1.0] * self.tabular_dim}
        return fit_standardization(np.stack([self.bags[i].tabular for i in train]))

    def training_patients(self) -> list[str]:
        """The training split's patient ids, or ``[]`` when the data cannot form one (only
        unlabelled patients, say): what the data-dependent standardisations are fitted on.
        ``fit`` itself still stops with the reason."""
        try:
            return self.split_ids["train"]
        except DataError:
            return []

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
            None: STAGES if self.predict_split else STAGES[:-1],  # all that exist
        }[stage]
        if any(s not in self.datasets for s in wanted):
            store, usable = self.build_store(list(self.bags.values()))
            by_id = {b.bag_id: b for b in usable}
            for split in wanted:
                ids = self._ids_for(split)
                self.datasets[split] = BagDataset(
                    [by_id[i] for i in ids if i in by_id],
                    self.split_store(split, store),
                    self.instance_transform(split),
                    self.max_instances if split == "train" else None,
                )

    def _ids_for(self, split: str) -> list[str]:
        ids = self.predict_split if split == "predict" else self.split_ids[split]
        if split == "val" and self.explicit_ids["val"] == []:
            return ids  # explicitly no validation: fixed epochs, ``limit_val_batches=0``
        if split == "test" and not ids:
            log.warning(
                "no test patients configured (test_fraction=0, no test_ids): testing on the "
                "validation patients, which were used for model selection; the figure is "
                "optimistic"
            )
            ids = self.split_ids["val"]
        if not ids:
            hint = (
                "the data holds no unlabelled patients (LABEL -1, e.g. testset/); name the "
                "patients to predict with predict_ids (--data.predict_ids '[P26, P27]')"
                if split == "predict"
                else "check the split settings"
            )
            raise DataError(f"no patients for the {split} split; {hint}")
        return ids

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(split, split))
        dataset = self.datasets[split]
        sampler: Sampler = EpochSeededSampler(len(dataset), split == "train", self.seed)
        if split != "train" and torch.distributed.is_available() and dist.is_initialized():
            # each patient evaluated exactly once across ranks (Lightning would pad)
            sampler = UnrepeatedDistributedSamplerWrapper(sampler, shuffle=False)
        return EpochLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_bags,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class PatientBagDataModule(BagDataModule):
    """Patients of a DLMI challenge folder (2021 or 2024 layout) as bags of cell crops.

    Each crop is decoded once into a memory-mapped cache (see `lympho_mil.data.image_cache`)
    and augmented from the cached pixels. The clinical vector is ``[age, log lymph count,
    sex_male]``; its standardisation is fitted on the training patients (``tabular_stats``).

    Args:
        root: the DLMI folder (holding ``trainset/`` and the clinical csv).
        image_size: side of the crops fed to the model, in pixels.
        center_crop: optional centre crop in source pixels before resizing (e.g. 112 keeps
            the lymphocyte and drops most red cells of a 224 px crop).
        cache_dir: where decoded crops are cached (default ``$LYMPHO_MIL_CACHE`` or
            ``~/.cache/lympho_mil``; never inside ``root`` unless you point it there).
        skip_bad_images: skip unreadable images with a warning instead of failing.
        reference_date: date at which ages are computed (ISO format).
        augment: train-time augmentation: flips, 90-degree rotations, affine, colour. True:
            `BagAugment` on each bag in the loader (OpenCV,
            random per crop, no hue). "gpu": the loader only slices uint8
            crops (shipped channels last); the torch pipeline of
            `lympho_mil.data.gpu_augment` (no hue) augments whole batches after their
            transfer to the training device
            (`on_after_batch_transfer`). False: none.
        affine, color_jitter: probabilities of those augmentation steps.
        mean, std: per-channel normalisation of pixels in [0, 1].
        cache_on_device: with ``augment="gpu"``, copy the decoded crops to the training device
            once (``image_size**2 * 3`` bytes per crop: 1 GB for 6,761 crops at 224 px); the
            training loader then ships row numbers only and the device gathers the pixels,
            so no crop crosses the host or the PCIe bus during training. Drawing row numbers
            takes microseconds: ``num_workers=0`` then beats worker processes (no
            inter-process latency, none at each epoch start).
        **kwargs: split and loader settings of `BagDataModule`.
    """

    feature_names = FEATURE_NAMES

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        center_crop: int | None = None,
        cache_dir: str | None = None,
        skip_bad_images: bool = False,
        reference_date: str = "2020-01-01",
        augment: bool | Literal["gpu"] = True,
        affine: float = 0.5,
        color_jitter: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        cache_on_device: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if augment not in (True, False, "gpu"):
            raise SettingError(f"augment must be True, False or 'gpu', got {augment!r}")
        if cache_on_device and augment != "gpu":
            raise SettingError("cache_on_device=True needs augment='gpu' (the device augments)")
        check_share("affine", affine)
        check_share("color_jitter", color_jitter)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise SettingError(f"mean and std need 3 values, std > 0; got {mean} and {std}")
        self.root = Path(root).expanduser()
        self.crop_spec = CropSpec(image_size, center_crop)
        self.cache_dir = cache_dir
        self.skip_bad_images = skip_bad_images
        self.reference_date = reference_date
        self.augment = augment
        self.affine = affine
        self.color_jitter = color_jitter
        self.mean, self.std = tuple(mean), tuple(std)
        self.cache_on_device = cache_on_device
        self._host_pixels: ImageCache | None = None
        self._device_pixels: torch.Tensor | None = None
        self._generator: torch.Generator | None = None  # of augment="gpu", per epoch
        self._generator_key: tuple[int, torch.device] | None = None
        self._paths: list[Path] = []

    def input_settings(self) -> dict[str, Any]:
        return {
            **super().input_settings(),
            "instances": "crops",
            "image_size": self.crop_spec.image_size,
            "center_crop": self.crop_spec.center_crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "reference_date": self.reference_date,
        }

    def load_bags(self) -> list[Bag]:
        frame, records = read_dlmi(self.root, self.reference_date)
        features = frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float32)
        bags, self._paths, start = [], [], 0
        for record, tabular in zip(records, features, strict=True):
            n = len(record.files)
            rows = np.arange(start, start + n, dtype=np.int64)
            bags.append(Bag(record.patient_id, record.label, rows, record.files, tabular))
            self._paths.extend(record.paths)
            start += n
        return bags

    def instance_paths(self, bag_id: str) -> list[Path]:
        """Files of patient ``bag_id``'s crops, in the order of its ``instance_ids``."""
        return [self._paths[row] for row in self.bags[bag_id].rows]

    def build_store(self, bags: Sequence[Bag]) -> tuple[InstanceStore, list[Bag]]:
        cache = ImageCache.build_or_load(
            self._paths, self.crop_spec, self.cache_dir, self.skip_bad_images
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

    def split_store(self, split: str, store: InstanceStore) -> InstanceStore:
        if split == "train" and self.cache_on_device:
            self._host_pixels, self._device_pixels = store, None  # type: ignore[assignment]
            return RowNumbers()
        return store

    def instance_transform(self, stage: str) -> InstanceTransform:
        if stage == "train" and self.cache_on_device:
            return rows_to_tensor
        if stage == "train" and self.augment == "gpu":
            return pixels_to_tensor
        augment = None
        if stage == "train" and self.augment:
            augment = BagAugment(affine=self.affine, color_jitter=self.color_jitter)
        return BagToTensor(augment, self.mean, self.std)

    @cached_property
    def device_augment(self) -> DeviceAugment:
        """The on-device pipeline of ``augment="gpu"`` (the CPU path's probabilities)."""
        return DeviceAugment(self.mean, self.std, affine=self.affine, color_p=self.color_jitter)

    def on_after_batch_transfer(self, batch: BagBatch, dataloader_idx: int) -> BagBatch:
        """Raw uint8 crops (``augment="gpu"``) or row numbers (``cache_on_device``) ->
        augmented when training, normalised.

        The draws come from a generator on the batch's device seeded by ``(seed, epoch)`` at
        the first batch of each epoch, so they repeat as the loader's own draws do.
        """
        if not isinstance(batch, BagBatch):
            return batch
        if self.cache_on_device and batch.instances.dtype == torch.int64:
            batch = dataclasses.replace(
                batch, instances=self.device_pixels(batch.instances.device)[batch.instances]
            )
        if batch.instances.dtype != torch.uint8:
            return batch
        generator = None
        if self.trainer is not None and self.trainer.training:
            generator = self._epoch_generator(batch.instances.device, self.trainer.current_epoch)
        pixels = batch.instances.permute(0, 1, 4, 2, 3)  # [B, N, H, W, C] -> [B, N, C, H, W]
        instances = self.device_augment(
            pixels, batch.mask, train=generator is not None, generator=generator
        )
        batch = dataclasses.replace(batch, instances=instances)
        if self.trainer is not None:  # the float crops made here, in the trainer's precision
            batch = self.trainer.precision_plugin.convert_input(batch)  # (e.g. bf16-true)
        return batch

    def device_pixels(self, device: torch.device) -> torch.Tensor:
        """uint8[rows, H, W, C]: the decoded-crop cache, copied to ``device`` once, in
        chunks (``cache_on_device``)."""
        if self._host_pixels is None:
            raise RuntimeError("device_pixels needs cache_on_device=True and setup('fit')")
        if self._device_pixels is None or self._device_pixels.device != device:
            host = self._host_pixels.array
            pixels = torch.empty(host.shape, dtype=torch.uint8, device=device)
            for start in range(0, len(host), DEVICE_COPY_ROWS):
                chunk = np.array(host[start : start + DEVICE_COPY_ROWS])
                pixels[start : start + len(chunk)] = torch.from_numpy(chunk)
            self._device_pixels = pixels
        return self._device_pixels

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":  # a new fit draws as a fresh run does, from (seed, epoch)
            self._generator = None
        super().setup(stage)

    def _epoch_generator(self, device: torch.device, epoch: int) -> torch.Generator:
        if self._generator is None or self._generator_key != (epoch, device):
            rank = self.trainer.global_rank if self.trainer is not None else 0
            # each DDP process its own draws, as each samples its own bags
            entropy = [self.seed, epoch, 1, *([rank] if rank else [])]
            seed = np.random.SeedSequence(entropy).generate_state(1)[0]
            self._generator = torch.Generator(device).manual_seed(int(seed))
            self._generator_key = (epoch, device)
        return self._generator
