"""Pure-PyTorch building blocks and whole networks: instance encoders, MIL pooling, clinical
standardisation, fusion, losses, test-time views, and each model family as one network
(`MILNet`, `InstanceNet`, `TabularNet`, `GatedFusionNet`, `LogitSumNet`) returning a
`BagOutput`. The lowest layer: it imports no Lightning and nothing of lympho-mil's other
layers, so every block and network works in a plain PyTorch loop."""

from lympho_mil.nn.encoders import (
    ENCODERS,
    EncoderSettings,
    EncoderWeightsError,
    FeatureColumns,
    IdentityEncoder,
    LeNetEncoder,
    MLPEncoder,
    SmallCNN,
    TimmEncoder,
    build_encoder,
    build_instance_encoder,
    encode_instances,
    freeze,
)
from lympho_mil.nn.fusion import ConcatFusion, FusionOutput, FusionSettings, GatedFusion
from lympho_mil.nn.loss import bce_with_logits, crop_bce
from lympho_mil.nn.morphology import MORPHOLOGY_FEATURES, MorphologyEncoder
from lympho_mil.nn.nets import (
    BagOutput,
    GatedFusionNet,
    InstanceNet,
    LogitSumNet,
    MILNet,
    TabularNet,
)
from lympho_mil.nn.pooling import (
    POOLINGS,
    AttentionPooling,
    DistributionPooling,
    GatedAttentionPooling,
    MaxPooling,
    MeanPooling,
    MILPooling,
    PoolingSettings,
    StatisticsPooling,
    build_pooling,
)
from lympho_mil.nn.tabular import Standardize
from lympho_mil.nn.tta import TTA_VIEWS, dihedral_views, tta_forward

__all__ = [
    "ENCODERS",
    "MORPHOLOGY_FEATURES",
    "POOLINGS",
    "TTA_VIEWS",
    "AttentionPooling",
    "BagOutput",
    "ConcatFusion",
    "DistributionPooling",
    "EncoderSettings",
    "EncoderWeightsError",
    "FeatureColumns",
    "FusionOutput",
    "FusionSettings",
    "GatedAttentionPooling",
    "GatedFusion",
    "GatedFusionNet",
    "IdentityEncoder",
    "InstanceNet",
    "LeNetEncoder",
    "LogitSumNet",
    "MILNet",
    "MILPooling",
    "MLPEncoder",
    "MaxPooling",
    "MeanPooling",
    "MorphologyEncoder",
    "PoolingSettings",
    "SmallCNN",
    "Standardize",
    "StatisticsPooling",
    "TabularNet",
    "TimmEncoder",
    "bce_with_logits",
    "build_encoder",
    "build_instance_encoder",
    "build_pooling",
    "crop_bce",
    "dihedral_views",
    "encode_instances",
    "freeze",
    "tta_forward",
]
