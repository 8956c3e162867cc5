"""Checkpoint files as the commands read them (their metadata, without their weights) and
write them (`RunCheckpoint`, the callback of ``--checkpoint.*`` and ``--last_checkpoint.*``)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lympho_mil.cli.errors import ConfigError
from lympho_mil.files import check_folder_writable, naming


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` loaded with ``weights_only=True``, its tensors memory-mapped
    (the CLI reads its metadata, not its weights); ConfigError when the file is not a
    Lightning checkpoint (unpicklable content is left to the caller's handler)."""
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is not a checkpoint (not a file that torch.save writes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, KeyError) as exc:
        raise ConfigError(f"cannot read the checkpoint {path}: {exc}") from exc
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= set(
        checkpoint
    ):
        raise ConfigError(f"{path} is not a Lightning checkpoint (no state_dict or version)")
    return checkpoint


def global_step(path: Path) -> int:
    """The training step a checkpoint file was written at (-1 if it cannot be read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any unreadable file: not a later state of the run
        return -1
    return int(checkpoint.get("global_step", -1)) if isinstance(checkpoint, dict) else -1


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that checks its folder can be written when ``fit`` starts
    (not at the end of the first epoch) and whose write errors name the checkpoint file (a
    disk that fills raises ENOSPC without a name). The file is written whole or not at all
    (Lightning writes a temporary file and renames it): the previous one stays."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.dirpath is not None and trainer.is_global_zero:
            check_folder_writable(self.dirpath)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as exc:
            raise naming(exc, filepath) from exc

    def _generate_state_key(self, **kwargs: Any) -> str:
        """The key of Lightning's ModelCheckpoint (its class name first): a checkpoint written
        by either restores the other's state (best score, folder)."""
        return f"{ModelCheckpoint.__qualname__}{kwargs!r}"
