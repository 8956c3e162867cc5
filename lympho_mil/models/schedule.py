"""The models' own optimiser and learning-rate schedule: AdamW and a cosine over the Trainer's
length, stretched when a resumed run asks for another length.

LightningCLI's ``optimizer:`` and ``lr_scheduler:`` sections (or ``--optimizer``) replace them
for a run; that cosine's length is then fixed in the config and never stretched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning import LightningModule, Trainer

from lympho_mil.arguments import SettingError, check_positive


@dataclass(frozen=True)
class OptimSettings:
    """The model's own optimiser (``optim:`` of a model's config).

    lr, weight_decay: AdamW's learning rate and (decoupled) weight decay.
    scheduler: "cosine" (annealed over ``trainer.max_epochs``, or per step over ``max_steps``
        when no epoch count is set) or "none".
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: Literal["cosine", "none"] = "cosine"

    def __post_init__(self) -> None:
        check_positive(lr=self.lr)
        if self.weight_decay < 0:
            raise SettingError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in ("cosine", "none"):
            raise SettingError(f"scheduler must be 'cosine' or 'none', got {self.scheduler!r}")


class ModelCosine(torch.optim.lr_scheduler.CosineAnnealingLR):
    """The cosine of ``scheduler="cosine"``: the one `stretch_cosine` may stretch."""


def configure_optimizers(module: LightningModule, settings: OptimSettings) -> Any:
    """AdamW on the trainable parameters of ``module`` and, with ``scheduler="cosine"``, a
    `ModelCosine` over the run's length (`cosine_horizon`): what
    ``LightningModule.configure_optimizers`` returns."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.scheduler == "none":
        return optimizer
    horizon, interval = cosine_horizon(module._trainer)
    cosine = ModelCosine(optimizer, T_max=horizon)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": interval}}


def cosine_horizon(trainer: Trainer | None) -> tuple[int, str]:
    """The cosine's length and unit: ``trainer.max_epochs`` epochs, or, with a step budget
    (``max_steps``) instead of epochs, that many steps (1 epoch without a trainer)."""
    epochs = trainer.max_epochs if trainer is not None else 1
    if epochs is not None and epochs > 0:
        return epochs, "epoch"
    assert trainer is not None
    steps = trainer.estimated_stepping_batches
    if math.isinf(steps):
        raise ValueError(
            "scheduler='cosine' anneals over trainer.max_epochs or max_steps, and neither "
            "is set (max_epochs=-1 trains without end): set one, or scheduler='none'"
        )
    return max(1, int(steps)), "step"


def stretch_cosine(trainer: Trainer) -> None:
    """A resumed run that asks for another length than the checkpoint's (``fit --ckpt_path
    ... --trainer.max_epochs`` more) stretches the model's cosine over the new length, from
    where the run stands; otherwise the restored schedule, already at its end, would train
    the extra epochs at a learning rate of 0. The run's progress is counted in the new
    length's unit, so a run resumed with a step budget instead of an epoch count (or the
    reverse) goes on from where it stands. Only `ModelCosine`: a scheduler given another way
    (LightningCLI's ``--lr_scheduler``) keeps its length."""
    for config in trainer.lr_scheduler_configs:
        cosine = config.scheduler
        if not isinstance(cosine, ModelCosine):
            continue
        horizon, interval = cosine_horizon(trainer)
        progress = trainer.global_step if interval == "step" else trainer.current_epoch
        if cosine.T_max == horizon and cosine.last_epoch == progress:
            continue
        cosine.T_max, cosine.last_epoch = horizon, progress
        done = min(progress, horizon)
        for group, base in zip(cosine.optimizer.param_groups, cosine.base_lrs, strict=True):
            group["lr"] = (
                cosine.eta_min
                + (base - cosine.eta_min) * (1 + math.cos(math.pi * done / horizon)) / 2
            )
        cosine._last_lr = [group["lr"] for group in cosine.optimizer.param_groups]
