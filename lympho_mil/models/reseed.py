"""Per-step reseeding: the model's randomness of a training step (dropout, say) depends only on
(seed, epoch, batch), so a resumed run draws as an uninterrupted one (the data side does the
same, see `lympho_mil.data.dataset.EpochSeededSampler`)."""

from __future__ import annotations

import os

import torch


def reseed_step(epoch: int, batch_idx: int) -> None:
    """Under ``seed_everything`` (``PL_GLOBAL_SEED`` set), seed torch from (seed, epoch,
    batch); without it, nothing."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        step_seed = (int(seed) * 1_000_003 + epoch) * 1_000_003 + batch_idx
        torch.manual_seed(step_seed % 2**63)  # any seed_everything seed (up to 2**32 - 1)
