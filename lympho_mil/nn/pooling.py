"""Mask-aware multiple-instance pooling.

Every operator maps instance embeddings ``h[B, N, D]`` and ``mask[B, N]`` (True where an
instance is real) to ``(z, a)``: the bag embedding ``z[B, D]`` (dtype of ``h``) and the
per-instance weights ``a[B, N]`` (float32, None for operators without attention).

Padded instances never change the result or the gradients, whatever they hold (junk, inf,
NaN): they are replaced before any arithmetic. Every bag must hold at least one real
instance; an empty bag gives NaN (attention) or -inf (max).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _clean(h: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    """``h[B, N, D]`` with padded rows set to ``value``."""
    return h.masked_fill(~mask.unsqueeze(-1), value)


def _linear32(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in float32, whatever the autocast state or the parameter dtype."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


class MILPooling(nn.Module):
    """Base of the pooling operators; ``has_attention`` says whether weights are returned."""

    has_attention: bool = False


class MeanPooling(MILPooling):
    """Average of the real instances."""

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        """``h[B, N, D]``, ``mask[B, N]`` -> ``(z[B, D], None)``."""
        total = _clean(h, mask).float().sum(dim=1)
        count = mask.sum(dim=1, keepdim=True).float()
        return (total / count).to(h.dtype), None


class MaxPooling(MILPooling):
    """Feature-wise maximum over the real instances."""

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        """``h[B, N, D]``, ``mask[B, N]`` -> ``(z[B, D], None)``."""
        return _clean(h, mask, float("-inf")).amax(dim=1), None


class AttentionPooling(MILPooling):
    """Attention pooling of Ilse et al. (2018): ``a = softmax_n(w^T tanh(V h_n))``.

    Scores and softmax run in float32 even under autocast; padded instances get score
    ``-inf``, hence weight exactly 0, and the weights sum to 1 over the real instances.
    """

    has_attention: bool = True

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def _hidden(self, h: Tensor) -> Tensor:
        """``h[B, N, D]`` (clean) -> float32 attention features ``[B, N, hidden]``."""
        return torch.tanh(_linear32(self.V, h))

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``h[B, N, D]``, ``mask[B, N]`` -> ``(z[B, D], a[B, N])``."""
        h = _clean(h, mask)
        with torch.autocast(h.device.type, enabled=False):
            scores = _linear32(self.w, self.dropout(self._hidden(h))).squeeze(-1)
            a = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
            z = (a.unsqueeze(-1) * h.float()).sum(dim=1)
        return z.to(h.dtype), a


class GatedAttentionPooling(AttentionPooling):
    """Gated attention of Ilse et al. (2018): ``a = softmax_n(w^T (tanh(V h) * sigmoid(U h)))``."""

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__(dim, hidden, dropout)
        self.U = nn.Linear(dim, hidden)

    def _hidden(self, h: Tensor) -> Tensor:
        return super()._hidden(h) * torch.sigmoid(_linear32(self.U, h))


POOLINGS: dict[str, type[MILPooling]] = {
    "mean": MeanPooling,
    "max": MaxPooling,
    "attention": AttentionPooling,
    "gated_attention": GatedAttentionPooling,
}


def build_pooling(name: str, dim: int, hidden: int = 128, dropout: float = 0.0) -> MILPooling:
    """The pooling called ``name`` (a key of ``POOLINGS``) for embeddings of size ``dim``."""
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose one of {sorted(POOLINGS)}")
    cls = POOLINGS[name]
    return cls(dim, hidden=hidden, dropout=dropout) if cls.has_attention else cls()
