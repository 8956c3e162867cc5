"""The Trainer the tests share: on the CPU unless told otherwise, and silent (no logger, no
checkpoints, no progress bar, no model summary)."""

from __future__ import annotations

from typing import Any

import lightning as L

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def quiet_trainer(**settings: Any) -> L.Trainer:
    """``L.Trainer`` with the quiet settings, ``accelerator="cpu"`` and ``settings`` on top."""
    return L.Trainer(**{**QUIET, "accelerator": "cpu", **settings})
