"""LightningModules: one base class holding a pure-torch network of ``nn`` (``self.net``) and
the training concerns around it (loss, metrics, optimiser and schedule, threshold, checkpoint
format, predict records), and small subclasses that build their networks. Reads batches of
``data``; never imports ``evaluation`` or the command layer."""

from lympho_mil.models.base import BagClassifier, NonFiniteLossError
from lympho_mil.models.checkpoint import CHECKPOINT_FORMAT, CheckpointFormatError
from lympho_mil.models.fusion import GatedFusionMIL
from lympho_mil.models.logit_sum import LogitSumMIL
from lympho_mil.models.mil import (
    AttentionMIL,
    EncoderClassifier,
    GatedAttentionMIL,
    InstanceMIL,
    MaxPoolMIL,
    MeanPoolMIL,
    MILClassifier,
    StatisticsPoolMIL,
)
from lympho_mil.models.schedule import OptimSettings
from lympho_mil.models.tabular import TabularMLP
from lympho_mil.nn import BagOutput

__all__ = [
    "CHECKPOINT_FORMAT",
    "AttentionMIL",
    "BagClassifier",
    "BagOutput",
    "CheckpointFormatError",
    "EncoderClassifier",
    "GatedAttentionMIL",
    "GatedFusionMIL",
    "InstanceMIL",
    "LogitSumMIL",
    "MILClassifier",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "NonFiniteLossError",
    "OptimSettings",
    "StatisticsPoolMIL",
    "TabularMLP",
]
