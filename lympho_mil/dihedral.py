"""The eight exact views of a square crop: its 90-degree rotations and their mirror images.

A blood-cell crop has no up, down, left or right. Augmentation (`lympho_mil.data`), the feature
cache's stored views (`lympho_mil.features`) and test-time augmentation (`lympho_mil.nn.tta`)
all use these views; they live here, below those layers, so that none imports another for them.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIHEDRAL_VIEWS = 8
"""Exact views of a square crop: 4 quarter turns, each with and without a mirror image."""


def dihedral(x: Tensor, view: int) -> Tensor:
    """View ``view`` (0-7) of ``x[..., H, W]``: ``view % 4`` quarter turns, then a left-right
    flip when ``view >= 4``. View 0 is ``x`` itself."""
    if not 0 <= view < DIHEDRAL_VIEWS:
        raise ValueError(f"view must be in 0..7, got {view}")
    x = torch.rot90(x, view % 4, dims=(-2, -1))
    return x.flip(-1) if view >= 4 else x


def stack_dihedral_views(x: Tensor) -> Tensor:
    """``x[M, C, H, W]`` -> its 8 dihedral views ``[M, 8, C, H, W]`` (view 0 first)."""
    return torch.stack([dihedral(x, v) for v in range(DIHEDRAL_VIEWS)], dim=1)
