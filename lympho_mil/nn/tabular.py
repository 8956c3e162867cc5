"""Clinical-vector modules: standardisation and a small MLP encoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Standardize(nn.Module):
    """``x[..., T]`` -> ``(x - mean) / scale``; ``mean`` and ``scale`` are checkpointed buffers."""

    mean: Tensor
    scale: Tensor

    def __init__(self, mean: Sequence[float], scale: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(scale):
            raise ValueError(f"mean has {len(mean)} values but scale has {len(scale)}")
        if not all(math.isfinite(m) for m in mean):
            raise ValueError(f"mean values must be finite, got {list(mean)}")
        if not all(s > 0 and math.isfinite(s) for s in scale):
            raise ValueError(f"scale values must be finite and > 0, got {list(scale)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(list(scale), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        """``x[..., T]`` -> standardised ``[..., T]``."""
        if x.shape[-1] != self.mean.numel():
            raise ValueError(
                f"Standardize was fitted on {self.mean.numel()} clinical features but got an "
                f"input with {x.shape[-1]} (shape {tuple(x.shape)})"
            )
        return (x - self.mean) / self.scale


class TabularEncoder(nn.Module):
    """Linear-GELU-Dropout-Linear-GELU: ``x[B, in_dim]`` -> ``[B, out_dim]``."""

    def __init__(
        self, in_dim: int, hidden: int = 32, out_dim: int = 16, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
            nn.GELU(),
        )
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """``x[B, in_dim]`` -> ``[B, out_dim]``."""
        return self.net(x)
