"""The checkpoint callback of the command line (``--checkpoint.*``, ``--last_checkpoint.*``)."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lympho_mil.files import check_folder_writable, naming


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
