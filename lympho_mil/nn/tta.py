"""Test-time augmentation over the dihedral views of crops (`lympho_mil.dihedral`).

A blood-cell crop has no up, down, left or right: its 90-degree rotations and mirror images
are as likely as the crop itself. Averaging a model's outputs over them removes the part of
its decision that depends on the orientation the slide happened to be scanned in.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lympho_mil.arguments import SettingError
from lympho_mil.dihedral import DIHEDRAL_VIEWS, dihedral
from lympho_mil.nn.nets import BagOutput

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


def mean_output(outs: list[BagOutput]) -> BagOutput:
    """The element-wise mean of the outputs of several views of one batch."""

    def mean(tensors: list[Tensor | None]) -> Tensor:
        present = [t for t in tensors if t is not None]
        if len(present) != len(tensors):
            raise ValueError("the views' outputs differ in which fields they hold")
        return torch.stack(present).mean(0)

    first = outs[0]
    return BagOutput(
        logit=mean([o.logit for o in outs]),
        weights=None if first.weights is None else mean([o.weights for o in outs]),
        instance_logits=(
            None if first.instance_logits is None else mean([o.instance_logits for o in outs])
        ),
        extras=(
            None
            if first.extras is None
            else {k: mean([(o.extras or {}).get(k) for o in outs]) for k in first.extras}
        ),
    )


def tta_forward(
    net: nn.Module, instances: Tensor, mask: Tensor, tabular: Tensor, views: int
) -> BagOutput:
    """``net``'s output (a network of `lympho_mil.nn.nets`) averaged over ``views`` exact
    views of the crops ``instances[B, N, C, H, W]`` (`dihedral_views`): the patient logit,
    crop weights, crop logits and extras are each the mean over the views."""
    return mean_output([net(view, mask, tabular) for view in dihedral_views(instances, views)])
