"""The Trainer the tests share: on the CPU unless told otherwise, and silent (no logger, no
checkpoints, no progress bar, no model summary); and the ``trainer:`` section of the configs
that tests write for the command line."""

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


def cli_trainer(root_dir: object, **settings: Any) -> dict[str, Any]:
    """The ``trainer:`` section of a test's config: the CPU, no progress bar or model summary,
    ``default_root_dir`` (as a string), ``settings`` on top."""
    return {
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root_dir),
        **settings,
    }
