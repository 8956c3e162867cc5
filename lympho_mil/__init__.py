"""lympho-mil: patient-level multiple-instance learning on bags of cell images + clinical data.

Quick tour::

    from lympho_mil import PatientBagDataModule, AttentionMIL
    from lympho_mil.data import CropSettings
    dm = PatientBagDataModule("path/to/dlmi", crops=CropSettings(image_size=64), max_instances=32)
    model = AttentionMIL(tabular_dim=dm.tabular_dim, tabular_stats=dm.tabular_stats)
    model.net  # the pure-PyTorch network it trains: a MILNet

The names below are imported on first use, so ``import lympho_mil.nn`` (pure PyTorch) loads
neither Lightning nor the data layer.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lympho_mil.version import __version__

_HOMES = {
    "lympho_mil.data": (
        "BagBatch",
        "BagDataModule",
        "DataError",
        "PatientBagDataModule",
        "SyntheticDataModule",
        "collate_bags",
        "make_synthetic_dlmi",
    ),
    # with the config-driven runners
    "lympho_mil.cli": ("compare_configs", "cross_validate", "evaluate_checkpoints"),
    "lympho_mil.nn": ("GatedFusionNet", "InstanceNet", "LogitSumNet", "MILNet", "TabularNet"),
    "lympho_mil.models": (
        "AttentionMIL",
        "BagClassifier",
        "BagOutput",
        "GatedAttentionMIL",
        "GatedFusionMIL",
        "InstanceMIL",
        "LogitSumMIL",
        "MILClassifier",
        "MaxPoolMIL",
        "MeanPoolMIL",
        "StatisticsPoolMIL",
        "TabularMLP",
    ),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "AttentionMIL",
    "BagBatch",
    "BagClassifier",
    "BagDataModule",
    "BagOutput",
    "DataError",
    "GatedAttentionMIL",
    "GatedFusionMIL",
    "GatedFusionNet",
    "InstanceMIL",
    "InstanceNet",
    "LogitSumMIL",
    "LogitSumNet",
    "MILClassifier",
    "MILNet",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "PatientBagDataModule",
    "StatisticsPoolMIL",
    "SyntheticDataModule",
    "TabularMLP",
    "TabularNet",
    "__version__",
    "collate_bags",
    "compare_configs",
    "cross_validate",
    "evaluate_checkpoints",
    "make_synthetic_dlmi",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its home module on first use (PEP 562)."""
    if name not in _HOME_OF:
        raise AttributeError(f"module 'lympho_mil' has no attribute {name!r}")
    value = getattr(import_module(_HOME_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME_OF])


if TYPE_CHECKING:  # the names as type checkers and IDEs see them
    from lympho_mil.cli import compare_configs, cross_validate, evaluate_checkpoints
    from lympho_mil.data import (
        BagBatch,
        BagDataModule,
        DataError,
        PatientBagDataModule,
        SyntheticDataModule,
        collate_bags,
        make_synthetic_dlmi,
    )
    from lympho_mil.models import (
        AttentionMIL,
        BagClassifier,
        BagOutput,
        GatedAttentionMIL,
        GatedFusionMIL,
        InstanceMIL,
        LogitSumMIL,
        MaxPoolMIL,
        MeanPoolMIL,
        MILClassifier,
        StatisticsPoolMIL,
        TabularMLP,
    )
    from lympho_mil.nn import GatedFusionNet, InstanceNet, LogitSumNet, MILNet, TabularNet
