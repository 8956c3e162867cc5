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
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from torch.utils.data import DataLoader, Sampler

from lympho_mil.arguments import as_settings, check_positive
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
from lympho_mil.data.dlmi_crops import DLMICrops
from lympho_mil.data.errors import DataError
from lympho_mil.data.gpu_augment import DeviceAugment, pixels_to_tensor, rows_to_tensor
from lympho_mil.data.image_cache import ImageCache
from lympho_mil.data.pseudo_labels import UNSURE, clinical_teacher_labels
from lympho_mil.data.settings import Augmentation, CropSettings, LoaderSettings, SplitSettings
from lympho_mil.data.splits import holdout_split, kfold_split
from lympho_mil.data.transforms import BagAugment, BagToTensor

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test", "predict")
DEVICE_COPY_ROWS = 1024  # crops per host -> device copy of cache_on_device (bounds host memory)


class BagDataModule(LightningDataModule, ABC):
    """Base class: split policy, clinical standardisation, datasets and loaders.

    Args:
        max_instances: random subset size of each training bag per step (None: whole bags).
            Validation, test and predict always see whole bags.
        seed: seed of the splits and of the data randomness (order, subsets, augmentation),
            which depends only on (seed, epoch) so resumed runs replay the same batches. A
            split depends on the seed and the order of the patients in the data (the csv
            rows); ``lympho-mil cv`` sorts them by id first.
        split: which patients train, validate and test (`SplitSettings`: a holdout or
            k-fold policy, or explicit id lists; co-training with ``teacher_confidence``).
        predict_ids: patients to predict (default: every unlabelled patient).
        loader: `LoaderSettings` (``batch_size``, ``num_workers``, ``pin_memory``,
            ``persistent_workers``).
    """

    def __init__(
        self,
        max_instances: int | None = None,
        seed: int = 0,
        split: SplitSettings = SplitSettings(),
        predict_ids: list[str] | None = None,
        loader: LoaderSettings = LoaderSettings(),
    ) -> None:
        super().__init__()
        check_positive(max_instances=max_instances)
        self.max_instances = max_instances
        self.seed = seed
        self.split = as_settings(SplitSettings, split)
        self.explicit_ids = self.split.explicit
        self.predict_ids = predict_ids
        self.loader = as_settings(LoaderSettings, loader)
        self.batch_size = self.loader.batch_size
        self.num_workers = self.loader.num_workers
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
        """Patient ids per stage: ``train`` (then the `teacher_labels` patients, if any),
        ``val``, ``test``, ``predict``."""
        splits = self.labelled_split
        return {**splits, "train": splits["train"] + list(self.teacher_labels)}

    @cached_property
    def labelled_split(self) -> dict[str, list[str]]:
        """The labelled patients per stage (``train``, ``val``, ``test``) and ``predict``."""
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
    def teacher_labels(self) -> dict[str, int]:
        """The unlabelled patients that train with the label of the clinical teacher
        (``split.teacher_confidence``), by id, in the data's order; empty without it."""
        train = self.labelled_split["train"]
        pool = [b for b in self.bags.values() if b.label == -1]
        confidence = self.split.teacher_confidence
        if confidence is not None and not pool:
            log.warning("co-training: the data holds no unlabelled patients, it trains without")
        if confidence is None or not train or not pool:
            return {}
        labels = clinical_teacher_labels(
            np.stack([self.bags[i].tabular for i in train]),
            np.array([self.bags[i].label for i in train]),
            np.stack([b.tabular for b in pool]),
            confidence,
        )
        chosen = {b.bag_id: int(y) for b, y in zip(pool, labels, strict=True) if y != UNSURE}
        log.info(
            "co-training: the clinical teacher labels %d of %d unlabelled patients "
            "(%d positive, %d negative); they join the %d labelled training patients",
            len(chosen),
            len(pool),
            sum(chosen.values()),
            len(chosen) - sum(chosen.values()),
            len(train),
        )
        return chosen

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
        policy = self.split
        try:
            if policy.test_fraction > 0:
                ids, test = holdout_split(ids, labels, policy.test_fraction, self.seed)
                labels = [self.bags[i].label for i in ids]
            if policy.n_folds is not None:
                train, val = kfold_split(ids, labels, policy.n_folds, policy.fold, self.seed)
            else:
                train, val = holdout_split(ids, labels, policy.val_fraction, self.seed)
        except ValueError as exc:
            raise DataError(
                f"cannot split the labelled patients (test_fraction={policy.test_fraction}, "
                f"val_fraction={policy.val_fraction}, n_folds={policy.n_folds}): {exc}; give "
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
        record = {
            "class": type(self).__name__,
            "settings": self.input_settings(),
            "train_ids": sorted(train),
            "val_ids": sorted(val),
        }
        if self.split.teacher_confidence is not None:
            record["teacher_labels"] = dict(sorted(self.teacher_labels.items()))
        return record

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
                bags = [by_id[i] for i in self._ids_for(split) if i in by_id]
                if split == "train" and self.teacher_labels:
                    bags = [self._with_teacher_label(b) for b in bags]
                self.datasets[split] = BagDataset(
                    bags,
                    self.split_store(split, store),
                    self.instance_transform(split),
                    self.max_instances if split == "train" else None,
                )

    def _with_teacher_label(self, bag: Bag) -> Bag:
        label = self.teacher_labels.get(bag.bag_id)
        return bag if label is None else dataclasses.replace(bag, label=label)

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
        loader = self.loader
        return EpochLoader(
            dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            collate_fn=collate_bags,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers and loader.num_workers > 0,
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
        crops: how each crop is decoded, cached and normalised (`CropSettings`:
            ``image_size``, ``center_crop``, ``mean``, ``std``, ``cache_dir``,
            ``skip_bad_images``).
        augment: train-time augmentation (`Augmentation`: ``mode`` "cpu", "gpu" or "none",
            ``affine``, ``color_jitter``, ``cache_on_device``).
        reference_date: date at which ages are computed (ISO format).
        **kwargs: split, prediction and loader settings of `BagDataModule`.
    """

    feature_names = FEATURE_NAMES

    def __init__(
        self,
        root: str,
        crops: CropSettings = CropSettings(),
        augment: Augmentation = Augmentation(),
        reference_date: str = "2020-01-01",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source = DLMICrops(root, as_settings(CropSettings, crops), reference_date)
        self.augment = as_settings(Augmentation, augment)
        self.crop_spec = self.source.crops.spec
        self.mean, self.std = self.source.crops.mean, self.source.crops.std
        self._host_pixels: ImageCache | None = None
        self._device_pixels: torch.Tensor | None = None
        self._generator: torch.Generator | None = None  # of augment="gpu", per epoch
        self._generator_key: tuple[int, torch.device] | None = None

    @property
    def cache_on_device(self) -> bool:
        """The decoded crops are copied to the training device (`Augmentation`)."""
        return self.augment.cache_on_device

    def input_settings(self) -> dict[str, Any]:
        return {**super().input_settings(), "instances": "crops", **self.source.input_settings()}

    def load_bags(self) -> list[Bag]:
        return self.source.load_bags()

    def instance_paths(self, bag_id: str) -> list[Path]:
        """Files of patient ``bag_id``'s crops, in the order of its ``instance_ids``."""
        return [self.source.paths[row] for row in self.bags[bag_id].rows]

    def build_store(self, bags: Sequence[Bag]) -> tuple[InstanceStore, list[Bag]]:
        return self.source.build_store(bags)

    def split_store(self, split: str, store: InstanceStore) -> InstanceStore:
        if split == "train" and self.cache_on_device:
            self._host_pixels, self._device_pixels = store, None  # type: ignore[assignment]
            return RowNumbers()
        return store

    def instance_transform(self, stage: str) -> InstanceTransform:
        if stage == "train" and self.cache_on_device:
            return rows_to_tensor
        if stage == "train" and self.augment.mode == "gpu":
            return pixels_to_tensor
        augment = None
        if stage == "train" and self.augment.mode == "cpu":
            augment = BagAugment(affine=self.augment.affine, color_jitter=self.augment.color_jitter)
        return BagToTensor(augment, self.mean, self.std)

    @cached_property
    def device_augment(self) -> DeviceAugment:
        """The on-device pipeline of augment mode "gpu" (the CPU path's probabilities)."""
        augment = self.augment
        return DeviceAugment(
            self.mean, self.std, affine=augment.affine, color_p=augment.color_jitter
        )

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
