"""The LightningCLI of ``lympho-mil`` (fit/validate/test/predict): parser, links, checkpoint policy.

Model and data are chosen by class name (``--model AttentionMIL``, ``class_path:
GatedFusionMIL`` in a config). The clinical vector size and its standardisation, fitted on
the training patients, flow from the datamodule into the model at instantiation.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning import Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)

from lympho_mil.cli.checkpoints import global_step, read_checkpoint
from lympho_mil.cli.errors import ConfigError, is_file
from lympho_mil.data import BagDataModule, SyntheticDataModule  # noqa: F401 (registers it)
from lympho_mil.evaluation.predictions import PredictionWriter
from lympho_mil.models import BagClassifier

MONITOR = "val_balanced_accuracy"
DEFAULT_RUNS = "runs"
DEFAULT_LOGGER: dict[str, Any] = {
    "class_path": "lightning.pytorch.loggers.CSVLogger",
    "init_args": {"save_dir": DEFAULT_RUNS},
}
"""Runs log to ``runs/`` (or ``--trainer.default_root_dir``) in the working directory."""
EVAL_SETTINGS = ("threshold", "tta_views", "chunk_size")
"""Model settings that ``--model.<name>`` may change on a trained checkpoint (``validate``,
``test``, ``predict``): how it decides and evaluates, not what it learnt."""


class LymphoCLI(LightningCLI):
    """LightningCLI with the links, the checkpoint policy and the prediction files."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data.tabular_dim", "model.init_args.tabular_dim", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.tabular_stats", "model.init_args.tabular_stats", apply_on="instantiate"
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # ``last.ckpt`` refreshed every epoch (Lightning's ``save_last`` writes it only when a
        # best checkpoint is written), so a killed run resumes from its latest epoch.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")
        parser.set_defaults(
            {
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": "max",
                "checkpoint.filename": "epoch{epoch:03d}-bacc{val_balanced_accuracy:.3f}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.monitor": "step",
                "last_checkpoint.mode": "max",
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(PredictionWriter, "prediction")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, remembering the evaluation settings given on the command line: with
        ``--ckpt_path``, LightningCLI then replaces every model argument by the checkpoint's,
        and `before_instantiate_classes` puts these back."""
        super().parse_arguments(parser, args)
        argv = sys.argv[1:] if args is None else args if isinstance(args, list) else []
        given = {a.split("=", 1)[0] for a in argv}
        subcommand = self.config.get("subcommand")
        self._asked_eval_settings = {
            key: self.config[subcommand]["model"]["init_args"][key]
            for key in EVAL_SETTINGS
            if subcommand and given & {f"--model.{key}", f"--model.init_args.{key}"}
        }
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and is_file(str(ckpt_path)):
            read_checkpoint(ckpt_path)  # a file that is no checkpoint: one line, not a traceback

    def before_instantiate_classes(self) -> None:
        """The evaluation settings asked on the command line win over the checkpoint's, and
        ``--trainer.default_root_dir`` moves the default logger's ``runs/`` folder."""
        subcommand = self.config.get("subcommand")
        for key, value in self._asked_eval_settings.items():
            self.config[subcommand]["model"]["init_args"][key] = value
        trainer = self.config[subcommand]["trainer"] if subcommand else self.config["trainer"]
        logger = trainer.get("logger")
        root = trainer.get("default_root_dir")
        if (
            root
            and getattr(logger, "class_path", None) == DEFAULT_LOGGER["class_path"]
            and logger.init_args.save_dir == DEFAULT_RUNS
        ):
            logger.init_args.save_dir = str(root)  # the default logger, moved with the root
        if subcommand in ("validate", "test", "predict"):
            _log_beside_an_earlier_run(logger)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        share_cpu_with_loader_workers(self.trainer, self.datamodule)
        if "threshold" in self._asked_eval_settings:
            self.model.threshold_asked = True  # even the value the checkpoint was trained with

    def _require_checkpoint(self) -> None:
        """validate, test and predict score a trained model: without ``--ckpt_path`` (or with
        ``last`` and no last.ckpt) they would score the freshly initialised weights of the
        config."""
        if self.config[self.subcommand].get("ckpt_path") is None:
            raise ConfigError(
                f"lympho-mil {self.subcommand} needs --ckpt_path (a checkpoint of `fit` or a "
                "fold model.ckpt of `cv`); without one it would use untrained weights"
            )
        self._resolve_last()

    before_validate = before_test = _require_checkpoint

    def before_predict(self) -> None:
        self._require_checkpoint()
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set at run time
        for callback in callbacks:
            if isinstance(callback, PredictionWriter):
                callback.check_outputs()  # existing files: refused before any crop is decoded

    def before_fit(self) -> None:
        self._resolve_last()
        self._continue_checkpoint_folder()

    def _continue_checkpoint_folder(self) -> None:
        """A run resumed from its latest checkpoint (no checkpoint of the folder its
        checkpoint callbacks wrote to is of a later step, e.g. its last.ckpt) goes on writing
        there: Lightning then restores their best score, so the best checkpoint stays the best
        over all epochs (in a new folder, the first epoch after the resume would become the
        best, whatever came before). A run branched from an older checkpoint writes into its
        own folder, and leaves the original run's files alone."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if not ckpt_path or not is_file(str(ckpt_path)):
            return
        checkpoint, given = read_checkpoint(ckpt_path), Path(ckpt_path).resolve()
        step = checkpoint.get("global_step", -1)
        folder = given.parent
        if any(global_step(p) > step for p in folder.glob("*.ckpt") if p.resolve() != given):
            return  # a branch from an older state of the run
        states = checkpoint.get("callbacks", {})
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set at run time
        for callback in callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback.dirpath is not None:
                continue  # a folder the user fixed stays
            saved = states.get(callback.state_key, {}).get("dirpath")
            if saved and Path(saved).resolve() == folder:
                callback.dirpath = saved  # as saved: Lightning compares it to restore the state
                warnings.filterwarnings(  # not empty: on purpose
                    "ignore", message=f"Checkpoint directory {re.escape(saved)} exists"
                )

    def _resolve_last(self) -> None:
        """``--ckpt_path last`` takes the newest run's ``last.ckpt``; ``--ckpt_path best``
        (validate, test, predict) the best checkpoint that this last.ckpt records. Each run
        logs into a new ``version_N`` folder, which holds no checkpoint yet, and Lightning
        alone would look only there and silently start from scratch (fit) or use untrained
        weights (``best`` it knows only within the run that trained)."""
        config = self.config_init[self.subcommand]
        name, callback = config.get("ckpt_path"), self.trainer.checkpoint_callback
        if name not in ("last", "best") or not isinstance(callback, ModelCheckpoint):
            return
        if name == "best" and self.subcommand == "fit":
            raise ConfigError("fit --ckpt_path best: resume from last, or pass a path")
        last = self._newest_last_checkpoint(callback, name)
        if last is None:
            return
        checkpoint = read_checkpoint(last)
        saved = checkpoint.get("lympho_mil", {}).get("class")
        if saved and saved != type(self.model).__name__:  # same keys may load silently
            raise ConfigError(
                f"--ckpt_path {name}: {last} comes from a {saved} run, but the config builds a "
                f"{type(self.model).__name__} (with {name}, the model comes from the config): "
                f"pass --model {saved}, or the checkpoint's path"
            )
        if name == "last":
            config["ckpt_path"] = str(last)
            return
        state = checkpoint.get("callbacks", {}).get(callback.state_key, {})
        recorded = Path(state.get("best_model_path") or "")
        beside = last.parent / recorded.name  # a relative path of another working directory
        found = [p for p in (beside, recorded) if recorded.name and p.is_file()]
        if not found:
            raise ConfigError(
                f"--ckpt_path best: {last} records no best checkpoint that still exists for "
                f"the monitor {callback.monitor!r}; pass the checkpoint's path"
            )
        config["ckpt_path"] = str(found[0])

    def _newest_last_checkpoint(self, callback: ModelCheckpoint, name: str) -> Path | None:
        """The newest ``last.ckpt`` of the configured checkpoint folder(s); ConfigError when
        there is none (None: a logger without a folder, left to Lightning)."""
        logger = self.trainer.logger
        if callback.dirpath:  # a fixed checkpoint folder
            where = f"{callback.dirpath} (--checkpoint.dirpath)"
            candidates = [Path(callback.dirpath) / "last.ckpt"]
        elif logger is None:  # checkpoints go to default_root_dir/checkpoints
            where = str(Path(self.trainer.default_root_dir) / "checkpoints")
            candidates = [Path(where) / "last.ckpt"]
        elif logger.root_dir is None:
            return None
        else:
            where = f"{logger.root_dir}/version_*/checkpoints"
            candidates = list(Path(logger.root_dir).glob("version_*/checkpoints/last.ckpt"))
        found = sorted((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(
                f"--ckpt_path {name}: no last.ckpt in {where}; pass the checkpoint's path"
            )
        return found[-1]

    def after_fit(self) -> None:
        """Report the best checkpoint's validation metrics (the quickstart ends with these)."""
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "")
        if not best or self.trainer.interrupted:
            return
        loggers, self.trainer.loggers = self.trainer.loggers, []  # not an epoch of the run's log
        try:
            results = self.trainer.validate(
                self.model, self.datamodule, ckpt_path=best, verbose=False
            )
        finally:
            self.trainer.loggers = loggers
        metrics = results[0] if results else {}
        if not self.trainer.is_global_zero:  # under DDP: once
            return
        print(
            f"best checkpoint: {best}\n"
            f"validation balanced accuracy: {metrics.get(MONITOR, float('nan')):.3f}  "
            f"AUROC: {metrics.get('val_auroc', float('nan')):.3f}"
        )


def _log_beside_an_earlier_run(logger: Any) -> None:
    """validate, test and predict with a config that names a log folder holding a run (the
    config.yaml of a ``cv`` fold, say) log into a new version folder: Lightning would
    overwrite that run's config.yaml and delete its metrics.csv."""
    args = getattr(logger, "init_args", None)
    if args is None or args.get("version") is None or "save_dir" not in args:
        return
    version = args.version
    folder = Path(args.save_dir or ".") / (args.get("name") or "")
    folder /= version if isinstance(version, str) else f"version_{version}"
    if any((folder / name).exists() for name in ("metrics.csv", "config.yaml", "hparams.yaml")):
        args.version = None


class RunConfigSaver(SaveConfigCallback):
    """Saves the run's config.yaml into its log folder; without a logger there is none, and
    nothing is written (Lightning would overwrite a config.yaml in the working directory)."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if trainer.loggers:
            super().setup(trainer, pl_module, stage)


def share_cpu_with_loader_workers(trainer: Trainer, datamodule: object) -> None:
    """On CPU, leave one core per loader worker: torch's default of one thread per core plus
    the workers oversubscribes the machine (measured: a quickstart epoch on 2 cores took
    13-17 s with 2 threads + 2 workers, 2-3.5 s with 1 thread). ``OMP_NUM_THREADS`` wins."""
    workers = getattr(datamodule, "num_workers", 0)
    if not isinstance(trainer.accelerator, CPUAccelerator) or workers < 1:
        return
    if "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) - workers)
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)


def build_cli(args: Sequence[str] | None, run: bool = True) -> LymphoCLI:
    """``LymphoCLI`` with the project defaults; ``run=False`` only instantiates (used by cv,
    also from Python: a bad config is then a ConfigError, not an exit of the interpreter).

    ``args=None`` reads ``sys.argv`` (the console script).
    """
    try:
        return _build_cli(args, run)
    except argparse.ArgumentError as exc:  # raised instead of exiting when run=False
        raise ConfigError(f"invalid config: {exc}") from exc


def _build_cli(args: Sequence[str] | None, run: bool) -> LymphoCLI:
    return LymphoCLI(
        BagClassifier,
        BagDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        run=run,
        trainer_defaults={"logger": DEFAULT_LOGGER},
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "epilog": "lympho-mil cv --help: repeated patient-level cross-validation of a fit "
            "config (not a LightningCLI subcommand, so not in the list above)",
            "exit_on_error": run,
        },
        auto_configure_optimizers=True,
    )


def class_choices(base: type) -> dict[str, type]:
    """Short names of the concrete subclasses of ``base`` (what ``--model NAME`` accepts)."""
    found: dict[str, type] = {}
    stack: list[type] = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        found[cls.__name__] = cls
    return dict(sorted(found.items()))


def check_class_names(argv: Sequence[str]) -> None:
    """Fail early, naming the valid choices, on an unknown ``--model``/``--data`` class.

    Reads the command line and the ``model``/``data`` ``class_path`` of each ``--config``.
    """
    given: list[tuple[str, str]] = []
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if key in ("--model", "--data"):
            given.append((key[2:], value))
        elif key == "--config" and is_file(value):
            try:
                config = yaml.safe_load(Path(value).read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"cannot read config {value}: {exc}") from None
            for section in ("model", "data"):
                entry = config.get(section) if isinstance(config, dict) else None
                if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
                    given.append((section, entry["class_path"]))
    bases = {"model": BagClassifier, "data": BagDataModule}
    for section, name in given:
        choices = class_choices(bases[section])
        if "." not in name and not name.startswith("{") and name not in choices:
            raise ConfigError(
                f"unknown {section} {name!r}; valid choices: {', '.join(choices)} "
                "(or a full import path such as mypackage.MyModel)"
            )
