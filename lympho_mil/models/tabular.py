"""The clinical-only model."""

from __future__ import annotations

from typing import Any

from lympho_mil.arguments import SettingError, check_positive, check_share
from lympho_mil.models.base import BagClassifier
from lympho_mil.nn import MLPEncoder, TabularNet


class TabularMLP(BagClassifier):
    """Clinical vector only (`lympho_mil.nn.TabularNet`): standardise -> small MLP -> logit.
    Ignores the crops.

    Args:
        hidden, embed_dim: sizes of the MLP's hidden layer and of the clinical embedding.
        dropout: dropout after the MLP's first layer.
        **kwargs: settings of `BagClassifier` (``tabular_dim`` must be > 0).
    """

    reads_instances = False
    reads_tabular = True

    def __init__(
        self, hidden: int = 32, embed_dim: int = 16, dropout: float = 0.1, **kwargs: Any
    ) -> None:
        check_positive(hidden=hidden, embed_dim=embed_dim)
        check_share("dropout", dropout, one_allowed=False)
        self.hidden, self.embed_dim, self.dropout = hidden, embed_dim, dropout
        super().__init__(**kwargs)

    def build_net(self) -> TabularNet:
        if self.tabular_dim < 1:
            raise SettingError("TabularMLP needs a clinical vector (tabular_dim >= 1)")
        encoder = MLPEncoder(self.tabular_dim, self.hidden, self.embed_dim, self.dropout)
        return TabularNet(self.standardize(), encoder)
