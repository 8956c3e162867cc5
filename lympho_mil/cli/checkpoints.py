"""Checkpoint files as the commands read them (their metadata, without their weights) and
write them (`RunCheckpoint`, the callback of ``--checkpoint.*`` and ``--last_checkpoint.*``)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lympho_mil.cli.errors import ConfigError
from lympho_mil.evaluation.ensemble import PROBABILITY_RULE, THRESHOLD_RULE
from lympho_mil.files import check_folder_writable, naming
from lympho_mil.models.base import check_format


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


@dataclass(frozen=True)
class CheckpointInfo:
    """What the commands read of a checkpoint before they use it.

    model: the model class's name.
    data: the data it was trained on (``class``, ``settings``, ``train_ids``, ``val_ids``;
        None in checkpoints of older versions).
    saved: when it was written (ISO date; the file's time for older checkpoints).
    validation: its validation scores (``val_balanced_accuracy``, ...), possibly none.
    threshold: the decision threshold it carries.
    choice: how that threshold was chosen (``policy``, ``n_patients``, ...), or None: the
        threshold setting it was trained with.
    """

    path: Path
    model: str
    data: dict[str, Any] | None
    saved: str
    validation: dict[str, float]
    threshold: float
    choice: dict[str, Any] | None

    @classmethod
    def read(cls, path: str | Path) -> CheckpointInfo:
        checkpoint = read_checkpoint(path)
        meta = check_format(checkpoint)
        mtime = datetime.fromtimestamp(Path(path).stat().st_mtime, tz=timezone.utc)
        threshold = checkpoint["state_dict"].get("threshold")
        return cls(
            path=Path(path),
            model=str(meta.get("class")),
            data=meta.get("data"),
            saved=meta.get("saved") or mtime.isoformat(timespec="seconds"),
            validation=dict(meta.get("validation") or {}),
            threshold=float(threshold) if threshold is not None else float("nan"),
            choice=meta.get("threshold"),
        )

    def differences(self, model: str | None, data: dict[str, Any] | None) -> list[str]:
        """What differs between this checkpoint and the model class and data settings a
        config builds, each as ``what: checkpoint's vs config's`` (nothing unrecorded)."""
        found = []
        if model is not None and model != self.model:
            found.append(f"model {self.model} vs {model}")
        ours = (self.data or {}).get("settings")
        if ours is not None and data is not None:
            for key in sorted(set(ours) | set(data)):
                if _plain(ours.get(key)) != _plain(data.get(key)):
                    found.append(f"data {key} {ours.get(key)!r} vs {data.get(key)!r}")
        return found

    def data_kind(self) -> str:
        """``crops (PatientBagDataModule)``: what its model reads, from which datamodule."""
        data = self.data or {}
        kind = (data.get("settings") or {}).get("instances", "unrecorded data")
        return f"{kind} ({data['class']})" if "class" in data else kind

    def summary(self) -> str:
        """``AttentionMIL on crops (PatientBagDataModule)``: the model and its data."""
        return f"{self.model} on {self.data_kind()}"

    def line(self, threshold: float, origin: str) -> str:
        """The one line a command prints before it uses this checkpoint."""
        scores = self.validation
        score = (
            f"validation balanced accuracy {scores['val_balanced_accuracy']:.3f}"
            if "val_balanced_accuracy" in scores
            else "no validation score"
        )
        if "val_auroc" in scores:
            score += f", AUROC {scores['val_auroc']:.3f}"
        return (
            f"checkpoint {self.path}: {self.summary()}, trained {self.saved[:16].replace('T', ' ')}"
            f" UTC, {score}; threshold {threshold:.3f} ({origin})"
        )

    def threshold_origin(self) -> str:
        """Where the threshold it carries comes from."""
        if not self.choice:
            return "the threshold setting it was trained with"
        c = self.choice
        if c.get("policy") == "fixed":
            return "fixed: the threshold setting, kept on purpose (threshold_policy fixed)"
        return f"chosen on its {c.get('n_patients', '?')} validation patients, {c.get('policy')}"


def _plain(value: Any) -> Any:
    """Tuples as lists, so settings read back from a checkpoint compare equal."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run_checkpoints(
    name: str, dirpath: str | Path | None, logger: Any, default_root_dir: str
) -> list[Path] | None:
    """The ``last.ckpt`` of every run the checkpoint settings point at, newest first: the
    fixed ``dirpath``, else each ``version_*`` of the logger's folder, else
    ``default_root_dir/checkpoints`` without a logger. None: a logger without a folder (left
    to Lightning); ConfigError naming where it looked when there is none (``name``: ``last``
    or ``best``, for the message)."""
    if dirpath:
        where = f"{dirpath} (--checkpoint.dirpath)"
        candidates = [Path(dirpath) / "last.ckpt"]
    elif logger is None:
        where = str(Path(default_root_dir) / "checkpoints")
        candidates = [Path(where) / "last.ckpt"]
    elif logger.root_dir is None:
        return None
    else:
        where = f"{logger.root_dir}/version_*/checkpoints"
        candidates = list(Path(logger.root_dir).glob("version_*/checkpoints/last.ckpt"))
    found = sorted((p for p in candidates if p.is_file()), key=lambda p: -p.stat().st_mtime)
    if not found:
        raise ConfigError(
            f"--ckpt_path {name}: no last.ckpt in {where}; pass the checkpoint's path"
        )
    return found


def newest_matching(
    name: str, candidates: list[Path], model: str, data: dict[str, Any]
) -> CheckpointInfo:
    """The newest of ``candidates`` whose run trained ``model`` on data of these settings;
    runs of another model or data in between are skipped. ConfigError naming the runs found
    when none fits."""
    infos = [CheckpointInfo.read(path) for path in candidates]
    for info in infos:
        if not info.differences(model, data):
            return info
    found = "; ".join(f"{i.path} comes from a {i.model} run on {i.data_kind()}" for i in infos[:5])
    raise ConfigError(
        f"--ckpt_path {name}: no run fits the config ({model} on {data.get('instances', '?')} "
        f"with these data settings): {found}; pass the checkpoint's path, or the config it was "
        "trained with"
    )


def recorded_best(last: Path, state_key: str, monitor: str | None) -> Path:
    """The best checkpoint that a run's ``last.ckpt`` records (found beside it when the run
    was written from another working directory)."""
    state = read_checkpoint(last).get("callbacks", {}).get(state_key, {})
    recorded = Path(state.get("best_model_path") or "")
    beside = last.parent / recorded.name
    found = [p for p in (beside, recorded) if recorded.name and p.is_file()]
    if not found:
        raise ConfigError(
            f"--ckpt_path best: {last} records no best checkpoint that still exists for the "
            f"monitor {monitor!r}; pass the checkpoint's path"
        )
    return found[0]


def several_checkpoints(value: str) -> list[Path] | None:
    """The checkpoints that ``--ckpt_path`` names when it names several: a ``cv`` output
    folder (its ``folds/*/model.ckpt``) or a list (``'[a.ckpt, b.ckpt]'``); None when it
    names one (or ``best``, ``last``). ConfigError for a folder without fold models or a
    missing file."""
    if value.lstrip().startswith("["):
        listed = yaml.safe_load(value)
        paths = [Path(str(p)) for p in listed] if isinstance(listed, list) else []
    elif Path(value).is_dir():
        paths = sorted(Path(value).glob("folds/*/model.ckpt"))
        if not paths:
            named = sorted({p.parts[-4] for p in Path(value).glob("*/folds/*/model.ckpt")})
            hint = f" (a comparison: name one config's folder, {named})" if named else ""
            raise ConfigError(f"--ckpt_path {value}: no cv fold models (folds/*/model.ckpt){hint}")
    else:
        return None
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise ConfigError(f"--ckpt_path {value}: no checkpoint file {missing or ''}")
    return paths


def ensemble_threshold_rule(infos: list[CheckpointInfo], threshold: float) -> str:
    """How the threshold of several checkpoints was found: a bag's (``lympho-mil bag``, or a
    cv fold's members) where every one carries it, chosen the same way; else `THRESHOLD_RULE`."""
    choice = infos[0].choice or {}
    bag = choice.get("pooled_over") == len(infos)
    if bag and all(i.threshold == threshold and i.choice == choice for i in infos):
        return (
            f"the bag's, which every model carries: {choice['policy']} on "
            f"{choice['n_patients']} validation patients, pooled over the models"
        )
    return THRESHOLD_RULE


def ensemble_line(infos: list[CheckpointInfo], threshold: float, rule: str) -> str:
    """The one line a command prints before it averages several checkpoints (``rule``: where
    the threshold comes from)."""
    key = "val_balanced_accuracy"
    scores = [i.validation[key] for i in infos if key in i.validation]
    score = f", mean validation balanced accuracy {sum(scores) / len(scores):.3f}" if scores else ""
    dates = sorted(i.saved[:10] for i in infos)
    trained = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    return (
        f"fold ensemble of {len(infos)} checkpoints ({infos[0].path.parent.parent}/...): "
        f"{infos[0].summary()}, trained {trained}{score}; probability: {PROBABILITY_RULE}; "
        f"threshold {threshold:.3f} ({rule})"
    )


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
