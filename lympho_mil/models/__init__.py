"""LightningModules: one base class (loss, metrics, optimiser, threshold, checkpoint format,
predict records) and small subclasses that build their networks from ``nn``. Reads batches of
``data``; never imports ``evaluation`` or the command layer."""

from lympho_mil.models.base import (
    BagClassifier,
    BagOutput,
    CheckpointFormatError,
    NonFiniteLossError,
)
from lympho_mil.models.mil import (
    AttentionMIL,
    GatedAttentionMIL,
    InstanceMIL,
    MaxPoolMIL,
    MeanPoolMIL,
    MILClassifier,
    StatisticsPoolMIL,
)
from lympho_mil.models.tabular import GatedFusionMIL, TabularMLP

__all__ = [
    "AttentionMIL",
    "BagClassifier",
    "BagOutput",
    "CheckpointFormatError",
    "GatedAttentionMIL",
    "GatedFusionMIL",
    "InstanceMIL",
    "MILClassifier",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "NonFiniteLossError",
    "StatisticsPoolMIL",
    "TabularMLP",
]
