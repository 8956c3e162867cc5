"""The standardisation of the clinical vector, fitted on the training patients and carried in
the checkpoint (its encoder is an `lympho_mil.nn.MLPEncoder`)."""

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
