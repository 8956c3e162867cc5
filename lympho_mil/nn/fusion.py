"""Fusion of a bag embedding with a clinical embedding into one patient-level prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lympho_mil.arguments import SettingError, check_positive

GATE_INPUTS = ("embeddings", "confidence")
"""What the gate of `GatedFusion` may see."""


class FusionOutput(NamedTuple):
    """Per-bag outputs, each ``[B]``; the expert fields are None for ``ConcatFusion``.

    ``logit`` and ``prob`` are float32 and describe the final probability ``p``.
    """

    logit: Tensor
    prob: Tensor
    gate: Tensor | None = None
    image_logit: Tensor | None = None
    tabular_logit: Tensor | None = None


class GatedFusion(nn.Module):
    """Mixture of two experts (Sahasrabudhe et al., IEEE JBHI 2021).

    ``p = g * sigmoid(s_img) + (1 - g) * sigmoid(s_tab)`` with ``s_img = Linear(z_img)`` and
    ``s_tab = Linear(z_tab)``. The gate ``g`` is, with ``gate_input="embeddings"`` (the
    published model), ``sigmoid(MLP([z_img, z_tab]))``; with ``gate_input="confidence"``,
    ``sigmoid(a * |s_img| - b * |s_tab| + c)`` on the experts' detached logits (``a = b = 1``,
    ``c = 0`` at start): trust the more confident expert. When the modalities are independent
    given the label, the decision of the more confident of two calibrated experts that disagree
    is that of the sum of their log-odds, which no single expert reaches; the gate's three
    parameters learn fast on few patients and, being fed detached logits, never pull on the
    experts. The logit of ``p`` is computed in log space in float32 (log-sum-exp of
    log-sigmoids), so it stays finite and the chosen expert keeps its gradient even when the
    gate saturates to exactly 0 or 1. Train with `lympho_mil.nn.bce_with_logits` on that
    logit: the negative log-likelihood of ``p``, finite with useful gradients even when ``p``
    saturates.

    Args:
        image_dim, tabular_dim: sizes of ``z_img`` and ``z_tab``.
        hidden: hidden size of the gate MLP (``gate_input="embeddings"`` only).
        gate_input: "embeddings" or "confidence" (anything else: ValueError).
    """

    def __init__(
        self,
        image_dim: int,
        tabular_dim: int,
        hidden: int = 32,
        gate_input: Literal["embeddings", "confidence"] = "embeddings",
    ) -> None:
        super().__init__()
        self.image_head = nn.Linear(image_dim, 1)
        self.tabular_head = nn.Linear(tabular_dim, 1)
        self.gate_input = gate_input
        if gate_input == "embeddings":
            self.gate = nn.Sequential(
                nn.Linear(image_dim + tabular_dim, hidden), nn.GELU(), nn.Linear(hidden, 1)
            )
        elif gate_input == "confidence":
            confidence = nn.Linear(2, 1)
            with torch.no_grad():
                confidence.weight.copy_(torch.tensor([[1.0, -1.0]]))
                confidence.bias.zero_()
            self.gate = nn.Sequential(confidence)
        else:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")

    def forward(self, z_img: Tensor, z_tab: Tensor) -> FusionOutput:
        """``z_img[B, Di]``, ``z_tab[B, Dt]`` -> ``FusionOutput`` of ``[B]`` tensors."""
        s_img = self.image_head(z_img).squeeze(-1).float()
        s_tab = self.tabular_head(z_tab).squeeze(-1).float()
        if self.gate_input == "confidence":
            confidence = torch.stack([s_img, s_tab], dim=-1).detach().abs()
            gate_in = confidence.to(next(self.gate.parameters()).dtype)  # float32 logits
        else:
            gate_in = torch.cat([z_img, z_tab], dim=-1)
        gate_logit = self.gate(gate_in).squeeze(-1).float()
        log_g, log_1mg = F.logsigmoid(gate_logit), F.logsigmoid(-gate_logit)
        log_p = torch.logaddexp(log_g + F.logsigmoid(s_img), log_1mg + F.logsigmoid(s_tab))
        log_q = torch.logaddexp(log_g + F.logsigmoid(-s_img), log_1mg + F.logsigmoid(-s_tab))
        logit = log_p - log_q
        return FusionOutput(
            logit=logit,
            prob=torch.sigmoid(logit),
            gate=torch.sigmoid(gate_logit),
            image_logit=s_img,
            tabular_logit=s_tab,
        )


class ConcatFusion(nn.Module):
    """Concatenation of ``z_img[B, image_dim]`` and ``z_tab[B, tabular_dim]``, then
    Linear-GELU-Dropout-Linear (``hidden`` units, ``dropout``) to one logit."""

    def __init__(
        self, image_dim: int, tabular_dim: int, hidden: int = 64, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(image_dim + tabular_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, z_img: Tensor, z_tab: Tensor) -> FusionOutput:
        """``z_img[B, Di]``, ``z_tab[B, Dt]`` -> ``FusionOutput`` (``logit``, ``prob`` only)."""
        logit = self.net(torch.cat([z_img, z_tab], dim=-1)).squeeze(-1).float()
        return FusionOutput(logit=logit, prob=torch.sigmoid(logit))


@dataclass(frozen=True)
class FusionSettings:
    """The fusion of `GatedFusionNet` (``fusion:`` of `GatedFusionMIL`'s config).

    kind: "gated" (`GatedFusion`, a mixture of an image and a clinical expert) or "concat"
        (`ConcatFusion`, the plain concatenation baseline).
    gate_input: what the gate sees: "embeddings" (the published model) or "confidence"
        (`GatedFusion`).
    gate_hidden: hidden size of the gate network (``gate_input="embeddings"``).
    tabular_hidden, tabular_embed_dim: sizes of the clinical MLP (`MLPEncoder`).
    """

    kind: Literal["gated", "concat"] = "gated"
    gate_input: Literal["embeddings", "confidence"] = "embeddings"
    gate_hidden: int = 32
    tabular_hidden: int = 32
    tabular_embed_dim: int = 16

    def __post_init__(self) -> None:
        check_positive(
            tabular_hidden=self.tabular_hidden,
            tabular_embed_dim=self.tabular_embed_dim,
            gate_hidden=self.gate_hidden,
        )
        if self.gate_input not in GATE_INPUTS:  # GatedFusion checks it too, concat has none
            raise SettingError(f"gate_input must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        if self.kind not in ("gated", "concat"):
            raise SettingError(f"fusion must be 'gated' or 'concat', got {self.kind!r}")

    def build(self, image_dim: int) -> GatedFusion | ConcatFusion:
        """The fusion of a pooled image embedding of size ``image_dim`` with the clinical
        embedding."""
        if self.kind == "gated":
            return GatedFusion(image_dim, self.tabular_embed_dim, self.gate_hidden, self.gate_input)
        return ConcatFusion(image_dim, self.tabular_embed_dim)
