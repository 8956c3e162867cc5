"""Opt-in speed-ups of an instance encoder that leave its parameters and state_dict keys alone,
so a checkpoint saved with them loads without them, and the other way round.

``torch.compile`` is applied with ``nn.Module.compile`` (in place) rather than
``torch.compile(module)``, whose ``OptimizedModule`` wrapper prefixes every state_dict key
with ``_orig_mod.``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _inputs_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: 4-D tensor arguments in channels-last memory format."""
    return tuple(
        a.contiguous(memory_format=torch.channels_last)
        if isinstance(a, Tensor) and a.dim() == 4
        else a
        for a in args
    )


def use_channels_last(module: nn.Module) -> None:
    """Keep the 4-D weights of ``module`` and its 4-D inputs ``x[M, C, H, W]`` channels-last
    (NHWC in memory), the layout tensor cores and cuDNN prefer under mixed precision.

    Only the memory layout changes: outputs are those of the default layout (up to float
    rounding), and encoders of features (2-D inputs, no 4-D weights) are unaffected.
    """
    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if _inputs_channels_last not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_inputs_channels_last)
