"""The multimodal model of the published study: an image bag and the clinical vector, fused
by a gate (`GatedFusionMIL`; adding experts' logits instead: `lympho_mil.models.logit_sum`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lympho_mil.arguments import SettingError, as_settings
from lympho_mil.data.batch import BagBatch
from lympho_mil.models.base import BagOutput
from lympho_mil.models.mil import EncoderClassifier
from lympho_mil.nn import (
    EncoderSettings,
    FusionSettings,
    GatedFusionNet,
    MLPEncoder,
    PoolingSettings,
    bce_with_logits,
)
from lympho_mil.nn.encoders import encoder_out_dim

CLINICAL_DROPOUT = 0.1
"""Dropout after the first layer of the fusion's clinical MLP."""


class GatedFusionMIL(EncoderClassifier):
    """Image bag + clinical vector (Sahasrabudhe et al., IEEE JBHI 2021;
    `lympho_mil.nn.GatedFusionNet`).

    With gated fusion, a mixture of two experts: ``p = g * sigmoid(s_img) + (1 - g) *
    sigmoid(s_tab)``, the gate ``g`` computed from the pooled image embedding and the clinical
    embedding (or, with ``gate_input: confidence``, from the experts' confidences), trained on
    the negative log-likelihood of ``p`` (the base class's BCE on the exact logit of ``p``).
    ``fusion.kind: concat`` is the plain concatenation baseline.

    With ``expert_loss_weight`` w > 0 (gated fusion only), the loss becomes
    ``NLL(p) + w * (BCE(s_img) + BCE(s_tab))``: each expert is also trained on the label by
    itself, the usual remedy when one expert (here the clinical one) learns much faster than
    the other and the gate stops passing gradient to the slow one.

    With mean pooling and gated fusion, the image expert (linear) scores each crop alone:
    ``instance_logits`` are these crop logits, whose mean is the image expert's logit (what
    ``predict`` reports per crop and the montages rank, where the uniform weights of the mean
    single out no crop).

    Args:
        encoder, chunk_size: see `EncoderClassifier`.
        pooling: the image pooling (`lympho_mil.nn.PoolingSettings`: ``name`` "attention",
            "gated_attention", "mean", "max", "distribution" or "statistics"; ``hidden``).
        fusion: the fusion (`lympho_mil.nn.FusionSettings`: ``kind`` "gated" or "concat",
            ``gate_input``, ``gate_hidden``, ``tabular_hidden``, ``tabular_embed_dim``).
        expert_loss_weight: weight w of the experts' auxiliary BCE (0: the mixture NLL only).
        **kwargs: settings of `BagClassifier` (``tabular_dim`` must be > 0).
    """

    reads_tabular = True

    def __init__(
        self,
        encoder: EncoderSettings = EncoderSettings(),
        chunk_size: int | None = 128,
        pooling: PoolingSettings = PoolingSettings(),
        fusion: FusionSettings = FusionSettings(),
        expert_loss_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.pooling_settings = as_settings(PoolingSettings, pooling)
        self.fusion_settings = as_settings(FusionSettings, fusion)
        if expert_loss_weight < 0:
            raise SettingError(f"expert_loss_weight must be >= 0, got {expert_loss_weight}")
        if expert_loss_weight and self.fusion_settings.kind != "gated":
            raise SettingError(
                "expert_loss_weight needs fusion kind 'gated' (concat has no experts)"
            )
        self.expert_loss_weight = expert_loss_weight
        super().__init__(encoder=encoder, chunk_size=chunk_size, **kwargs)

    def build_net(self) -> GatedFusionNet:
        if self.tabular_dim < 1:
            raise SettingError("GatedFusionMIL needs a clinical vector (tabular_dim >= 1)")
        encoder = self.build_encoder()
        pooling = self.pooling_settings.build(encoder_out_dim(encoder))
        image_dim = pooling.output_dim(encoder_out_dim(encoder))
        settings = self.fusion_settings
        clinical = MLPEncoder(
            self.tabular_dim, settings.tabular_hidden, settings.tabular_embed_dim, CLINICAL_DROPOUT
        )
        fusion = settings.build(image_dim)
        return GatedFusionNet(
            encoder, pooling, self.standardize(), clinical, fusion, **self.net_chunking
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
