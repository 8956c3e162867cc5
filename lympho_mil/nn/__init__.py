"""Pure-PyTorch building blocks: instance encoders, MIL pooling, clinical encoders, fusion,
test-time views. The lowest layer: it imports no Lightning and nothing of lympho-mil's other
layers, so every block works in plain PyTorch."""

from lympho_mil.nn.encoders import (
    BUILTIN_ENCODERS,
    EncoderWeightsError,
    IdentityEncoder,
    LeNetEncoder,
    MLPEncoder,
    SmallCNN,
    TimmEncoder,
    build_instance_encoder,
    encode_instances,
    freeze,
)
from lympho_mil.nn.fusion import ConcatFusion, FusionOutput, GatedFusion, mixture_nll
from lympho_mil.nn.morphology import MORPHOLOGY_FEATURES, MorphologyEncoder
from lympho_mil.nn.pooling import (
    POOLINGS,
    AttentionPooling,
    DistributionPooling,
    GatedAttentionPooling,
    MaxPooling,
    MeanPooling,
    MILPooling,
    StatisticsPooling,
    build_pooling,
)
from lympho_mil.nn.tabular import Standardize, TabularEncoder
from lympho_mil.nn.tta import TTA_VIEWS, dihedral_views

__all__ = [
    "BUILTIN_ENCODERS",
    "MORPHOLOGY_FEATURES",
    "POOLINGS",
    "TTA_VIEWS",
    "AttentionPooling",
    "ConcatFusion",
    "DistributionPooling",
    "EncoderWeightsError",
    "FusionOutput",
    "GatedAttentionPooling",
    "GatedFusion",
    "IdentityEncoder",
    "LeNetEncoder",
    "MILPooling",
    "MLPEncoder",
    "MaxPooling",
    "MeanPooling",
    "MorphologyEncoder",
    "SmallCNN",
    "Standardize",
    "StatisticsPooling",
    "TabularEncoder",
    "TimmEncoder",
    "build_instance_encoder",
    "build_pooling",
    "dihedral_views",
    "encode_instances",
    "freeze",
    "mixture_nll",
]
