"""Data layer: clinical table, DLMI layout, caches, bag datasets, the batch contract, collate,
transforms, splits and datamodules. Above ``nn`` (the feature cache runs its encoders), below
``models``, ``evaluation`` and the command layer, which it never imports."""

from lympho_mil.data.bag_sources import (
    FeatureBagDataModule,
    FeatureBags,
    MNISTBagsDataModule,
    bags_from_arrays,
    read_mil_file,
    read_mnist_bags,
)
from lympho_mil.data.batch import BagBatch, BagSample, collate_bags
from lympho_mil.data.clinical import FEATURE_NAMES, fit_standardization
from lympho_mil.data.datamodule import BagDataModule, PatientBagDataModule
from lympho_mil.data.dataset import Bag, BagDataset
from lympho_mil.data.dlmi import PatientRecord, read_dlmi
from lympho_mil.data.errors import DataError
from lympho_mil.data.image_cache import CropSpec, ImageCache
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.data.synthetic_datamodule import SyntheticDataModule

__all__ = [
    "FEATURE_NAMES",
    "Bag",
    "BagBatch",
    "BagDataModule",
    "BagDataset",
    "BagSample",
    "CropSpec",
    "DataError",
    "FeatureBagDataModule",
    "FeatureBags",
    "ImageCache",
    "MNISTBagsDataModule",
    "PatientBagDataModule",
    "PatientRecord",
    "SyntheticDataModule",
    "bags_from_arrays",
    "collate_bags",
    "fit_standardization",
    "make_synthetic_dlmi",
    "read_dlmi",
    "read_mil_file",
    "read_mnist_bags",
]
