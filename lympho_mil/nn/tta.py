"""Test-time augmentation: the dihedral views of every crop of a bag.

A blood-cell crop has no up, down, left or right: its 90-degree rotations and mirror images
are as likely as the crop itself. Averaging a model's outputs over them removes the part of
its decision that depends on the orientation the slide happened to be scanned in.
"""

from __future__ import annotations

import torch
from torch import Tensor

TTA_VIEWS = (1, 2, 4, 8)
"""Numbers of views: 1 = the crops as they are, 2 = and their mirror images, 4 = the four
90-degree rotations, 8 = the four rotations and their mirror images (the dihedral group)."""


def check_tta_views(views: int) -> None:
    if views not in TTA_VIEWS:
        raise ValueError(f"tta_views must be one of {TTA_VIEWS}, got {views!r}")


def dihedral_views(instances: Tensor, views: int) -> list[Tensor]:
    """``views`` exact pixel views of float[B, N, C, H, W] crops, the identity first.

    Rotations need square crops (H == W); every view keeps the crop order, shape and the
    contiguous layout (an odd rotation alone would swap the H and W strides: another input
    layout to a compiled encoder, which recompiles for it).
    """
    check_tta_views(views)
    if instances.ndim != 5:
        raise ValueError(
            f"test-time augmentation needs image crops [B, N, C, H, W], got a "
            f"{instances.ndim}-D tensor {tuple(instances.shape)} (feature bags have no "
            "orientation: set tta_views to 1)"
        )
    height, width = instances.shape[-2:]
    if views > 2 and height != width:
        raise ValueError(
            f"tta_views={views} rotates the crops, which needs square crops, got {height}x"
            f"{width}; use tta_views=2 (mirror images only) or square crops"
        )
    if views == 1:
        return [instances]
    if views == 2:
        return [instances, instances.flip(-1)]
    rotations = [torch.rot90(instances, k, dims=(-2, -1)).contiguous() for k in range(4)]
    return rotations if views == 4 else rotations + [r.flip(-1) for r in rotations]
