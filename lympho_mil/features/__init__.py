"""Crop features: hand-crafted cytometry with scikit-image, and self-supervised pretraining of
a crop encoder on the crops themselves (SimCLR with lightly). The feature cache
(`lympho_mil.data.CachedFeatureDataModule`) runs them over every crop once."""

from lympho_mil.features.cytometry import CYTOMETRY_FEATURES, CytometryEncoder, cytometry_features
from lympho_mil.features.pretrain import PretrainSettings, pretrain_simclr, pretrained_encoder

__all__ = [
    "CYTOMETRY_FEATURES",
    "CytometryEncoder",
    "PretrainSettings",
    "cytometry_features",
    "pretrain_simclr",
    "pretrained_encoder",
]
