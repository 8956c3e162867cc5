"""What a model adds to its checkpoints (``checkpoint["lympho_mil"]``), its format version, and
the conversion of checkpoints written in earlier formats.

Format 1 (up to lympho-mil 0.1.0 as first released): each model built its layers itself, from
flat settings (``encoder``, ``embed_dim``, ``lr``, ...). Format 2: the model holds one network
of `lympho_mil.nn` as ``net`` (state-dict keys ``net.*``) and takes grouped settings
(``encoder: {name, out_dim, ...}``, ``optim: {lr, ...}``, ...). `upgrade` converts a
checkpoint of any earlier format in memory, so it loads as it did (the files stay as they are).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lympho_mil.files import naming

CHECKPOINT_FORMAT = 2
"""Version of what `BagClassifier` adds to a checkpoint and of the layout of its weights and
settings; `upgrade` converts every earlier one."""


class CheckpointFormatError(ValueError):
    """A checkpoint lacks lympho-mil's format marker or carries a version this one cannot
    read."""


def check_format(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The lympho-mil record of a checkpoint (``checkpoint["lympho_mil"]``), converted from an
    earlier format in place (`upgrade`); `CheckpointFormatError` when it has none, or a
    version this lympho-mil does not know."""
    return upgrade(checkpoint)["lympho_mil"]


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` converted in place from its format to `CHECKPOINT_FORMAT`, one version
    at a time (`CONVERTERS`), and returned."""
    meta = checkpoint.get("lympho_mil")
    found = meta.get("format") if isinstance(meta, dict) else None
    if found == CHECKPOINT_FORMAT:
        return checkpoint
    if found not in CONVERTERS:
        newer = isinstance(found, int) and found > CHECKPOINT_FORMAT
        hint = "a newer lympho-mil wrote it" if newer else "was it written by lympho-mil?"
        raise CheckpointFormatError(
            f"checkpoint format {found!r} is not the one this lympho-mil reads (1 to "
            f"{CHECKPOINT_FORMAT}); {hint}"
        )
    while checkpoint["lympho_mil"]["format"] != CHECKPOINT_FORMAT:
        CONVERTERS[checkpoint["lympho_mil"]["format"]](checkpoint)
    return checkpoint


FORMAT_1_CLINICAL = ("TabularMLP", "GatedFusionMIL")
"""The format-1 models whose networks read the clinical vector (the others carried an unused
standardisation)."""
FORMAT_1_GROUPS: dict[str, dict[str, tuple[str, Any]]] = {
    "optim": {
        "lr": ("lr", 1e-3),
        "weight_decay": ("weight_decay", 1e-4),
        "scheduler": ("scheduler", "cosine"),
    },
    "encoder": {
        "name": ("encoder", "small_cnn"),
        "out_dim": ("embed_dim", 128),
        "in_dim": ("in_dim", None),
        "kwargs": ("encoder_kwargs", None),
        "weights": ("encoder_weights", None),
        "freeze": ("freeze_encoder", False),
        "shape_multiple": ("shape_multiple", None),
        "channels_last": ("channels_last", False),
        "compile": ("compile_encoder", False),
    },
    "pooling": {"name": ("pooling", "attention"), "hidden": ("attention_hidden", 128)},
    "fusion": {
        "kind": ("fusion", "gated"),
        "gate_input": ("gate_input", "embeddings"),
        "gate_hidden": ("gate_hidden", 32),
        "tabular_hidden": ("tabular_hidden", 32),
        "tabular_embed_dim": ("tabular_embed_dim", 16),
    },
}
"""Format 2's grouped settings: for each field, the format-1 argument it comes from and that
argument's default."""


def _from_format_1(checkpoint: dict[str, Any]) -> None:
    """Format 1 -> 2: weights under ``net.``, grouped settings, `GatedFusionMIL`'s module."""
    meta = checkpoint["lympho_mil"]
    clinical = meta.get("class") in FORMAT_1_CLINICAL
    checkpoint["state_dict"] = {
        key if key == "threshold" else f"net.{key}": value
        for key, value in checkpoint["state_dict"].items()
        if clinical or not key.startswith("standardize.")
    }
    hparams = checkpoint.get("hyper_parameters")
    if hparams is not None:
        checkpoint["hyper_parameters"] = _settings_from_format_1(dict(hparams))
    meta["format"] = 2


def _settings_from_format_1(hparams: dict[str, Any]) -> dict[str, Any]:
    """Format-1 model arguments -> format 2's: each group (`FORMAT_1_GROUPS`) that the model
    had; GatedFusionMIL loses ``dropout`` (it had no effect) and ``attention_hidden`` moves
    into its ``pooling``."""
    fused = isinstance(hparams.get("fusion"), str)
    groups = ["optim"]
    groups += ["encoder"] if isinstance(hparams.get("encoder"), str) else []
    groups += ["pooling", "fusion"] if fused else []
    for group in groups:
        fields = FORMAT_1_GROUPS[group]
        hparams[group] = {new: hparams.pop(old, default) for new, (old, default) in fields.items()}
    if fused:
        hparams.pop("dropout", None)
    if hparams.get("_class_path") == "lympho_mil.models.tabular.GatedFusionMIL":
        hparams["_class_path"] = "lympho_mil.models.fusion.GatedFusionMIL"
    return hparams


CONVERTERS: dict[int, Callable[[dict[str, Any]], None]] = {1: _from_format_1}
"""Converters by the format they read: each turns a checkpoint of that format into one of
the next, in place."""


def write_record(checkpoint: dict[str, Any], record: dict[str, Any]) -> None:
    """Put ``record`` (the model's class, threshold setting, run record) into ``checkpoint``
    under ``"lympho_mil"`` with the format version. An encoder's initial weights file is
    moved from the settings into the record: the state dict holds the weights, so reloading
    must not need the file, nor ask for pretrained weights (without the file, a download)."""
    checkpoint["lympho_mil"] = {"format": CHECKPOINT_FORMAT, **record}
    hparams = checkpoint.get("hyper_parameters", {})
    encoder = hparams.get("encoder")
    if not isinstance(encoder, dict) or encoder.get("weights") is None:
        return
    checkpoint["lympho_mil"]["initial_encoder_weights"] = encoder["weights"]
    kwargs = dict(encoder.get("kwargs") or {})
    if kwargs.get("pretrained"):
        kwargs["pretrained"] = False
    unloaded = {**encoder, "weights": None, "kwargs": kwargs}
    checkpoint["hyper_parameters"] = {**hparams, "encoder": unloaded}  # a copy: the model's
    # own settings stay as they are


def store_threshold(path: Path, value: float, notes: dict[str, Any]) -> None:
    """Write a threshold chosen after training into the checkpoint at ``path``: its buffer,
    and ``notes`` (how it was chosen, the validation scores) into its record. Atomic: the
    file is replaced by a rename, never left half-written."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["state_dict"]["threshold"] = torch.tensor(value, dtype=torch.float32)
    meta = checkpoint["lympho_mil"]
    meta["threshold"] = notes["threshold"]
    meta["validation"] = {**meta.get("validation", {}), **notes["validation"]}
    partial = path.with_name(f".{path.name}.partial")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, path)
    except OSError as exc:  # a full disk names no file; the previous checkpoint stays
        partial.unlink(missing_ok=True)
        raise naming(exc, path) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
