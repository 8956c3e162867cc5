"""Data layer: clinical table, DLMI layout, caches, bag datasets, the batch contract, collate,
transforms, splits, the datamodules and their grouped settings. It knows no model: it imports
neither ``nn`` nor any layer above (``features``, ``models``, ``evaluation``, the command
layer)."""

from lympho_mil.data.bag_sources import (
    FeatureBagDataModule,
    FeatureBags,
    MNISTBagsDataModule,
    MNISTBagSettings,
    bags_from_arrays,
    read_mil_file,
    read_mnist_bags,
)
from lympho_mil.data.batch import BagBatch, BagSample, collate_bags
from lympho_mil.data.clinical import FEATURE_NAMES, fit_standardization
from lympho_mil.data.datamodule import BagDataModule, PatientBagDataModule
from lympho_mil.data.dataset import Bag, BagDataset
from lympho_mil.data.dlmi import PatientRecord, read_dlmi
from lympho_mil.data.dlmi_crops import DLMICrops
from lympho_mil.data.errors import DataError
from lympho_mil.data.image_cache import CropSpec, ImageCache
from lympho_mil.data.settings import Augmentation, CropSettings, LoaderSettings, SplitSettings
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.data.synthetic_datamodule import SyntheticDataModule, SyntheticSettings

__all__ = [
    "FEATURE_NAMES",
    "Augmentation",
    "Bag",
    "BagBatch",
    "BagDataModule",
    "BagDataset",
    "BagSample",
    "CropSettings",
    "CropSpec",
    "DLMICrops",
    "DataError",
    "FeatureBagDataModule",
    "FeatureBags",
    "ImageCache",
    "LoaderSettings",
    "MNISTBagSettings",
    "MNISTBagsDataModule",
    "PatientBagDataModule",
    "PatientRecord",
    "SplitSettings",
    "SyntheticDataModule",
    "SyntheticSettings",
    "bags_from_arrays",
    "collate_bags",
    "fit_standardization",
    "make_synthetic_dlmi",
    "read_dlmi",
    "read_mil_file",
    "read_mnist_bags",
]
