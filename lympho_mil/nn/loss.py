"""The training losses of the networks, in float32 whatever the autocast state.

Every network's patient logit is trained on `bce_with_logits`; for `GatedFusionNet` that is
the negative log-likelihood of its mixture probability, from the exact logit of the mixture
(finite, with useful gradients, even when the probability saturates). `crop_bce` trains the
crop logits of `InstanceNet`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bce_with_logits(logit: Tensor, target: Tensor, pos_weight: float | None = None) -> Tensor:
    """Mean BCE of ``logit[B]`` against ``target[B]`` (0/1), in float32; ``pos_weight``
    scales the positive class's term."""
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=logit.device)
    return F.binary_cross_entropy_with_logits(logit.float(), target.float(), pos_weight=weight)


def crop_bce(
    crop_logits: Tensor, target: Tensor, mask: Tensor, pos_weight: float | None = None
) -> Tensor:
    """BCE of every real crop's logit ``crop_logits[B, N]`` against its bag's ``target[B]``,
    averaged per bag over the crops of ``mask[B, N]``, then over the bags; ``pos_weight`` as
    `bce_with_logits`."""
    expanded = target.unsqueeze(1).expand_as(crop_logits)
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=target.device)
    per_crop = F.binary_cross_entropy_with_logits(
        crop_logits, expanded, pos_weight=weight, reduction="none"
    )
    per_bag = (per_crop * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_bag.mean()
