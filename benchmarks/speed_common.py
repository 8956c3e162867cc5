"""What the benchmarks share: the ``--data`` argument, the machine, JSON lines, quiet runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dlmi-dev"


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--data`` (a DLMI folder) and ``--cache-dir``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a DLMI folder")
    parser.add_argument(
        "--cache-dir", default=None, help="decoded-crop cache (default: LYMPHO_MIL_CACHE)"
    )
    return parser


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where a figure comes from; the load average matters on a shared machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_avg": [round(x, 1) for x in os.getloadavg()],
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def emit(name: str, device: str | torch.device = "cpu", **figures: Any) -> None:
    """Print one measurement as a JSON line: name, figures, machine."""
    print(json.dumps({"name": name, **figures, "machine": machine(device)}), flush=True)


def quiet() -> None:
    """Silence Lightning's per-fit chatter."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def quiet_trainer(**settings: Any) -> L.Trainer:
    """``L.Trainer`` on the CPU unless told otherwise, without logger, checkpoints, progress
    bar or model summary; ``settings`` on top."""
    quiet_settings = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }
    return L.Trainer(**{**quiet_settings, **settings})
