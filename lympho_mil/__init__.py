"""lympho-mil: patient-level multiple-instance learning on bags of cell images + clinical data.

Quick tour::

    from lympho_mil import PatientBagDataModule, AttentionMIL
    dm = PatientBagDataModule("path/to/dlmi", image_size=64, max_instances=32)
    model = AttentionMIL(tabular_dim=dm.tabular_dim, tabular_stats=dm.tabular_stats)
"""

from lympho_mil.cli import compare_configs, cross_validate
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
    MaxPoolMIL,
    MeanPoolMIL,
    MILClassifier,
    TabularMLP,
)
from lympho_mil.version import __version__

__all__ = [
    "AttentionMIL",
    "BagBatch",
    "BagClassifier",
    "BagDataModule",
    "BagOutput",
    "DataError",
    "GatedAttentionMIL",
    "GatedFusionMIL",
    "InstanceMIL",
    "MILClassifier",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "PatientBagDataModule",
    "SyntheticDataModule",
    "TabularMLP",
    "__version__",
    "collate_bags",
    "compare_configs",
    "cross_validate",
    "make_synthetic_dlmi",
]
