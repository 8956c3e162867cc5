"""Crop features, the layer between the data and the models: frozen encoders run over every
decoded crop once (hand-crafted cytometry with scikit-image, the morphology encoder, timm or
self-supervised networks), their cache, the datamodule that serves them as bags
(`CachedFeatureDataModule`), and self-supervised pretraining of a crop encoder on the crops
themselves (SimCLR or DINO, with lightly)."""

from lympho_mil.features.cache import (
    CachedFeatureDataModule,
    CellTypeSettings,
    FeatureCache,
    FeatureSource,
    FeatureSpec,
    extract_features,
)
from lympho_mil.features.cytometry import CYTOMETRY_FEATURES, CytometryEncoder, cytometry_features
from lympho_mil.features.pretrain import (
    PretrainSettings,
    folder_crops,
    pretrain_encoder,
    pretrained_encoder,
)

__all__ = [
    "CYTOMETRY_FEATURES",
    "CachedFeatureDataModule",
    "CellTypeSettings",
    "CytometryEncoder",
    "FeatureCache",
    "FeatureSource",
    "FeatureSpec",
    "PretrainSettings",
    "cytometry_features",
    "extract_features",
    "folder_crops",
    "pretrain_encoder",
    "pretrained_encoder",
]
