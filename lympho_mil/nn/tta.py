"""Test-time augmentation over the dihedral views of crops (`lympho_mil.dihedral`).

A blood-cell crop has no up, down, left or right: its 90-degree rotations and mirror images
are as likely as the crop itself. Averaging a model's outputs over them removes the part of
its decision that depends on the orientation the slide happened to be scanned in.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from lympho_mil.arguments import SettingError
from lympho_mil.dihedral import DIHEDRAL_VIEWS, dihedral

TTA_VIEWS = (1, 2, 4, 8)
"""Numbers of test-time views: 1 = the crops as they are, 2 = and their left-right mirror
images, 4 = the four 90-degree rotations, 8 = the four rotations and their mirror images."""

_VIEW_INDICES = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: tuple(range(DIHEDRAL_VIEWS))}


def check_tta_views(views: int) -> None:
    if views not in TTA_VIEWS:
        raise SettingError(f"tta_views must be one of {TTA_VIEWS}, got {views!r}")


def dihedral_views(instances: Tensor, views: int) -> Iterator[Tensor]:
    """``views`` exact pixel views of float[B, N, C, H, W] crops, the identity first, made
    one at a time (a model averaged over them holds one view in memory, not all).

    Rotations need square crops (H == W); every view keeps the crop order, shape and the
    contiguous layout (an odd rotation alone would swap the H and W strides: another input
    layout to a compiled encoder, which recompiles for it). Checks run at the call.
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
    return (dihedral(instances, view).contiguous() for view in _VIEW_INDICES[views])
