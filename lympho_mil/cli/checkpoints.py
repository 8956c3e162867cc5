"""Checkpoint files as the commands read them: their metadata, without their weights."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from lympho_mil.cli.errors import ConfigError


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
