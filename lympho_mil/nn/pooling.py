"""Mask-aware multiple-instance pooling.

Every operator maps instance embeddings ``h[B, N, D]`` and ``mask[B, N]`` (True where an
instance is real) to ``(z, a)``: the bag embedding ``z[B, output_dim(D)]`` (dtype of ``h``;
``D`` except for ``DistributionPooling`` and ``StatisticsPooling``) and the per-instance
weights ``a[B, N]`` (float32, None for operators without attention).

Padded instances never change the result or the gradients, whatever they hold (junk, inf,
NaN): they are replaced before any arithmetic. Every bag must hold at least one real
instance; an empty bag gives NaN (mean, attention, distribution) or -inf (max).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lympho_mil.arguments import SettingError, check_positive


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

    def output_dim(self, dim: int) -> int:
        """Size of the bag embedding ``z`` for instance embeddings of size ``dim``."""
        return dim


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
    ``dim``: size D of the embeddings; ``hidden``: size of ``V h``; ``dropout``: on the
    attention features before ``w``.
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


class DistributionPooling(MILPooling):
    """The mean of the real instances and, per feature, the share of them above fixed levels.

    ``z = [mean_n h, mean_n sigmoid((h - t_1) / T), ..., mean_n sigmoid((h - t_K) / T)]``: on
    standardised features (z-scores over training instances), the levels ``(-1, 1)`` give the
    share of atypically low and high instances of each feature, what a haematologist reads off
    a smear. The soft step (temperature ``T``) keeps gradients for a trainable encoder.
    ``levels`` are the ``K`` levels ``t_k``, ``temperature`` is ``T`` (> 0).
    """

    levels: Tensor

    def __init__(self, levels: Sequence[float] = (-1.0, 1.0), temperature: float = 0.1) -> None:
        super().__init__()
        if not levels or temperature <= 0:
            raise ValueError(f"need levels and temperature > 0, got {levels}, {temperature}")
        self.register_buffer("levels", torch.tensor(list(levels), dtype=torch.float32))
        self.temperature = temperature

    def output_dim(self, dim: int) -> int:
        return dim * (1 + self.levels.numel())

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        """``h[B, N, D]``, ``mask[B, N]`` -> ``(z[B, D * (1 + K)], None)``."""
        x = _clean(h, mask).float()
        count = mask.sum(dim=1).float()[:, None]  # [B, 1]
        steps = torch.sigmoid((x.unsqueeze(-1) - self.levels) / self.temperature)  # [B, N, D, K]
        shares = (steps * mask[:, :, None, None]).sum(dim=1) / count.unsqueeze(-1)  # [B, D, K]
        mean = x.sum(dim=1) / count
        z = torch.cat([mean, shares.transpose(1, 2).flatten(1)], dim=1)
        return z.to(h.dtype), None


class StatisticsPooling(MILPooling):
    """Per feature, the mean, standard deviation and quantiles of the real instances.

    ``z = [mean_n h, std_n h, q_1(h), ..., q_K(h)]``: the patient-level statistics of crop
    features (cytometry, say) that a plain linear model reads well. Quantiles interpolate
    linearly between order statistics, as ``numpy.quantile`` does; the standard deviation is
    the population one (0 for a single instance). ``quantiles`` are the ``K`` levels in
    [0, 1].
    """

    levels: Tensor

    def __init__(self, quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> None:
        super().__init__()
        if not quantiles or not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"need quantiles in [0, 1], got {quantiles}")
        self.register_buffer("levels", torch.tensor(list(quantiles), dtype=torch.float32))

    def output_dim(self, dim: int) -> int:
        return dim * (2 + self.levels.numel())

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        """``h[B, N, D]``, ``mask[B, N]`` -> ``(z[B, D * (2 + K)], None)``."""
        x = _clean(h, mask).float()
        count = mask.sum(dim=1).float()[:, None]  # [B, 1]
        mean = x.sum(dim=1) / count
        spread = (_clean(x - mean.unsqueeze(1), mask) ** 2).sum(dim=1) / count
        ordered = _clean(x, mask, float("inf")).sort(dim=1).values  # real instances first
        position = self.levels[None, :] * (count - 1)  # [B, K]
        below = position.floor().long()
        above = (below + 1).clamp(max=ordered.shape[1] - 1)
        step = (position - below)[..., None]  # [B, K, 1]
        low = ordered.gather(1, below[..., None].expand(-1, -1, x.shape[-1]))
        high = ordered.gather(1, above[..., None].expand(-1, -1, x.shape[-1]))
        high = torch.where(step > 0, high, low)  # an infinite pad never enters at step 0
        quantiles = low + step * (high - low)  # [B, K, D]
        std = spread.clamp(min=1e-12).sqrt()  # finite gradient for a single instance
        z = torch.cat([mean, std, quantiles.flatten(1)], dim=1)
        return z.to(h.dtype), None


POOLINGS: dict[str, type[MILPooling]] = {
    "mean": MeanPooling,
    "max": MaxPooling,
    "attention": AttentionPooling,
    "gated_attention": GatedAttentionPooling,
    "distribution": DistributionPooling,
    "statistics": StatisticsPooling,
}
"""The pooling operators by name, as `build_pooling` and the models' ``pooling`` take
them."""


def build_pooling(name: str, dim: int, hidden: int = 128, dropout: float = 0.0) -> MILPooling:
    """The pooling called ``name`` (a key of ``POOLINGS``) for embeddings of size ``dim``.

    ``hidden`` and ``dropout`` configure the attention poolings and are ignored by the others
    (``"distribution"`` and ``"statistics"`` take their default levels). Raises ValueError
    for an unknown name.
    """
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose one of {sorted(POOLINGS)}")
    cls = POOLINGS[name]
    return cls(dim, hidden=hidden, dropout=dropout) if cls.has_attention else cls()


@dataclass(frozen=True)
class PoolingSettings:
    """A pooling as models take it (``pooling:`` of `GatedFusionMIL`'s config).

    name: a key of `POOLINGS`.
    hidden: hidden size of the attention network (attention poolings only).
    """

    name: str = "attention"
    hidden: int = 128

    def __post_init__(self) -> None:
        check_positive(hidden=self.hidden)
        if self.name not in POOLINGS:
            raise SettingError(f"unknown pooling {self.name!r}; choose one of {sorted(POOLINGS)}")

    def build(self, dim: int) -> MILPooling:
        """The pooling for embeddings of size ``dim`` (`build_pooling`)."""
        return build_pooling(self.name, dim, self.hidden)
