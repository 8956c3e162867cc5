"""Clinical-only model and the multimodal gated fusion."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from torch import Tensor, nn

from lympho_mil.arguments import SettingError, check_positive, check_share
from lympho_mil.data.batch import BagBatch
from lympho_mil.models.base import BagClassifier, BagOutput, bce_with_logits
from lympho_mil.models.mil import MILClassifier
from lympho_mil.nn import ConcatFusion, GatedFusion, TabularEncoder
from lympho_mil.nn.fusion import GATE_INPUTS


class TabularMLP(BagClassifier):
    """Clinical vector only: standardise -> small MLP -> logit. Ignores the crops.

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
        self.save_hyperparameters()

    def configure_models(self) -> None:
        if self.tabular_dim < 1:
            raise SettingError("TabularMLP needs a clinical vector (tabular_dim >= 1)")
        self.tabular_encoder = TabularEncoder(
            self.tabular_dim, self.hidden, self.embed_dim, self.dropout
        )
        self.head = nn.Linear(self.embed_dim, 1)

    def forward(self, batch: BagBatch) -> BagOutput:
        z = self.tabular_encoder(self.standardize(batch.tabular))
        return BagOutput(logit=self.head(z).squeeze(-1))


class GatedFusionMIL(MILClassifier):
    """Image bag + clinical vector (Sahasrabudhe et al., IEEE JBHI 2021).

    With ``fusion="gated"``, a mixture of two experts: ``p = g * sigmoid(s_img) + (1 - g) *
    sigmoid(s_tab)``, the gate ``g`` computed from the pooled image embedding and the clinical
    embedding, trained on the negative log-likelihood of ``p`` (the base class's BCE on the
    exact logit of ``p``, see `lympho_mil.nn.mixture_nll`). ``fusion="concat"`` is the
    plain concatenation baseline.

    With ``expert_loss_weight`` w > 0 (gated fusion only), the loss becomes
    ``NLL(p) + w * (BCE(s_img) + BCE(s_tab))``: each expert is also trained on the label by
    itself, the usual remedy when one expert (here the clinical one) learns much faster than
    the other and the gate stops passing gradient to the slow one. ``gate_input="confidence"``
    gates on the experts' detached confidences instead of the embeddings (see
    `lympho_mil.nn.GatedFusion`).

    With mean pooling and gated fusion, the image expert (linear) scores each crop alone:
    ``instance_logits`` are these crop logits, whose mean is the image expert's logit (what
    ``predict`` reports per crop and the montages rank, where the uniform weights of the mean
    single out no crop).

    Args:
        pooling: the image pooling ("attention", "gated_attention", "mean", "max",
            "distribution").
        fusion: "gated" or "concat".
        tabular_hidden, tabular_embed_dim: sizes of the clinical MLP.
        gate_hidden: hidden size of the gate network (``gate_input="embeddings"``).
        gate_input: what the gate sees: "embeddings" (published model) or "confidence".
        expert_loss_weight: weight w of the experts' auxiliary BCE (0: the mixture NLL only).
        **kwargs: encoder and pooling settings of `MILClassifier` (its ``dropout`` has
            no effect here, with a warning: the fusion replaces its head) and those of
            `BagClassifier`
            (``tabular_dim`` must be > 0).
    """

    default_pooling = "attention"  # the ``pooling`` argument sets it per model

    def __init__(
        self,
        pooling: str = "attention",
        fusion: Literal["gated", "concat"] = "gated",
        tabular_hidden: int = 32,
        tabular_embed_dim: int = 16,
        gate_hidden: int = 32,
        expert_loss_weight: float = 0.0,
        gate_input: Literal["embeddings", "confidence"] = "embeddings",
        **kwargs: Any,
    ) -> None:
        if expert_loss_weight < 0:
            raise SettingError(f"expert_loss_weight must be >= 0, got {expert_loss_weight}")
        check_positive(
            tabular_hidden=tabular_hidden,
            tabular_embed_dim=tabular_embed_dim,
            gate_hidden=gate_hidden,
        )
        if gate_input not in GATE_INPUTS:  # checked by GatedFusion too, but concat has none
            raise SettingError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        if expert_loss_weight and fusion != "gated":
            raise SettingError("expert_loss_weight needs fusion='gated' (concat has no experts)")
        self.default_pooling = pooling
        self.fusion_kind = fusion
        self.tabular_hidden = tabular_hidden
        self.tabular_embed_dim = tabular_embed_dim
        self.gate_hidden = gate_hidden
        self.expert_loss_weight = expert_loss_weight
        self.gate_input = gate_input
        if kwargs.get("dropout"):
            warnings.warn(
                "GatedFusionMIL ignores dropout: the fusion replaces the head it applies to "
                "(kept as an argument so that older checkpoints load)",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(**kwargs)

    reads_tabular = True

    def configure_models(self) -> None:
        if self.tabular_dim < 1:
            raise SettingError("GatedFusionMIL needs a clinical vector (tabular_dim >= 1)")
        self.configure_bag_embedding()
        dim = self.bag_dim
        self.tabular_encoder = TabularEncoder(
            self.tabular_dim, self.tabular_hidden, self.tabular_embed_dim
        )
        if self.fusion_kind == "gated":
            self.fusion: nn.Module = GatedFusion(
                dim, self.tabular_embed_dim, self.gate_hidden, self.gate_input
            )
        elif self.fusion_kind == "concat":
            self.fusion = ConcatFusion(dim, self.tabular_embed_dim)
        else:
            raise SettingError(f"fusion must be 'gated' or 'concat', got {self.fusion_kind!r}")

    def forward(self, batch: BagBatch) -> BagOutput:
        h = self.encode(batch)
        z_img, weights = self.pool(h, batch.mask)
        z_tab = self.tabular_encoder(self.standardize(batch.tabular))
        fused = self.fusion(z_img, z_tab)
        crop_logits = None
        if self.pooling_name == "mean" and isinstance(self.fusion, GatedFusion):
            # the image expert is linear on the mean crop: its logit is the mean of these
            crop_logits = self.fusion.image_head(h).squeeze(-1).float()
            crop_logits = crop_logits.masked_fill(~batch.mask, 0.0)
        extras = {
            k: v
            for k, v in (
                ("gate", fused.gate),
                ("image_logit", fused.image_logit),
                ("tabular_logit", fused.tabular_logit),
            )
            if v is not None
        }
        return BagOutput(
            logit=fused.logit, weights=weights, instance_logits=crop_logits, extras=extras
        )

    def loss(self, out: BagOutput, batch: BagBatch) -> Tensor:
        """The mixture NLL, plus ``expert_loss_weight`` times each expert's own BCE."""
        loss = super().loss(out, batch)
        if not self.expert_loss_weight or out.extras is None:
            return loss
        for name in ("image_logit", "tabular_logit"):
            expert = bce_with_logits(out.extras[name], batch.label, self.pos_weight)
            loss = loss + self.expert_loss_weight * expert
        return loss
