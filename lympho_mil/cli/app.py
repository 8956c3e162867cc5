"""The LightningCLI of ``lympho-mil``: its subcommands, parser, links and checkpoint policy.

Model and data are chosen by class name (``--model AttentionMIL``, ``class_path:
GatedFusionMIL`` in a config). The clinical vector size and its standardisation, fitted on
the training patients, flow from the datamodule into the model at instantiation. Lightning's
fit, validate, test and predict run its Trainer; a further subcommand (``cv``) registers a
`Command` here: its options become a ``--<name>.*`` group (and a ``<name>:`` section of a
config) and it runs on the parsed config instead of a Trainer method.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import shutil
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
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

from lympho_mil.cli.checkpoints import (
    CheckpointInfo,
    RunCheckpoint,
    ensemble_line,
    ensemble_threshold_rule,
    global_step,
    newest_matching,
    read_checkpoint,
    recorded_best,
    run_checkpoints,
    several_checkpoints,
)
from lympho_mil.cli.errors import ConfigError, is_file
from lympho_mil.cli.parser import LymphoParser, short_message
from lympho_mil.data import BagDataModule, SyntheticDataModule  # noqa: F401 (registers it)
from lympho_mil.evaluation.ensemble import ensemble_records
from lympho_mil.evaluation.predictions import PredictionWriter, gather_records
from lympho_mil.evaluation.thresholds import THRESHOLD_POLICIES, choose_on_validation
from lympho_mil.features import CachedFeatureDataModule  # noqa: F401 (registers it)
from lympho_mil.files import check_folder_writable
from lympho_mil.models import BagClassifier
from lympho_mil.models.checkpoint import store_threshold, upgrade
from lympho_mil.progress import LOG_LEVELS, set_log_level
from lympho_mil.version import __version__

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
DESCRIPTION = (
    "lympho-mil: patient-level diagnosis (reactive or tumoral lymphocytosis) from bags of "
    "blood-smear cell crops and clinical data."
)
LIGHTNING_COMMANDS = {
    "fit": "train a model on the training patients; keeps its best and last checkpoints",
    "validate": "score a checkpoint (--ckpt_path) on the validation patients",
    "test": "score a checkpoint (--ckpt_path) on the test patients",
    "predict": "write a checkpoint's predictions (--ckpt_path) of the patients to predict",
}
"""Lympho-mil's one-line description of each of Lightning's subcommands."""
_SCORE_HELP = (
    "the checkpoint to use (required: without one the weights would be untrained): a path, "
    "'best' (the best checkpoint recorded by the newest run of the config's model and data) "
    "or 'last' (that run's last.ckpt); one that does not fit the config is refused. With "
    "'best' or 'last' the model comes from the config; with a path, from the checkpoint, "
    "except --model.threshold, --model.tta_views and --model.chunk_size."
)
CKPT_PATH_HELP = {
    "fit": "resume training from a checkpoint: a path, or 'last' (the newest last.ckpt of the "
    "runs folder, or of --checkpoint.dirpath); a resumed run goes on writing checkpoints "
    "into the folder of the run it resumes. 'best' is refused (resume from last).",
    "validate": _SCORE_HELP,
    "test": _SCORE_HELP,
    "predict": _SCORE_HELP + " Or several, averaged as cv's fold ensemble: a cv output folder "
    "(its folds/*/model.ckpt) or a list '[a.ckpt, b.ckpt]'.",
}
"""``--ckpt_path`` as lympho-mil reads it (Lightning's own help says otherwise)."""
EMPTY_RUN = {"config.yaml", "hparams.yaml"}
"""What a run folder holds before anything is logged."""
LIGHTNING_NOISE = (
    r".*LeafSpec.* is deprecated",  # Lightning's own use of torch.utils._pytree
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
)
"""Warnings of Lightning's that mean nothing for these commands (`without_lightning_noise`)."""


@dataclass(frozen=True)
class Command:
    """A subcommand beyond Lightning's four.

    description: its one line in ``lympho-mil --help``.
    options: a dataclass whose fields become the ``--<name>.<field>`` options.
    run: runs it on the parsed `LymphoCLI` (nothing is instantiated for it).
    arguments: adds its options outside its own section (``evaluate``'s ``--ckpt_path``).
    """

    description: str
    options: type
    run: Callable[[LymphoCLI], None]
    arguments: Callable[[LightningArgumentParser], None] | None = None


@dataclass(frozen=True)
class CheckpointUse:
    """What a scoring command used, as its one line says (`LymphoCLI.checkpoint_use`).

    infos: the checkpoint, or each of a fold ensemble.
    threshold: the decision threshold applied.
    origin: where the threshold comes from (an ensemble's, unless the config sets one:
        `ensemble_threshold_rule`).
    line: the line printed.
    """

    infos: list[CheckpointInfo]
    threshold: float
    origin: str
    line: str

    def threshold_source(self) -> str:
        """Where the threshold comes from, naming the checkpoint(s): what a report says."""
        if len(self.infos) > 1:
            folder = self.infos[0].path.parent.parent
            return f"fold ensemble of {len(self.infos)} checkpoints ({folder}): {self.origin}"
        return f"checkpoint {self.infos[0].path}: {self.origin}"


COMMANDS: dict[str, Command] = {}
"""The registered subcommands beyond Lightning's, by name (see `register`)."""


def register(name: str, command: Command) -> None:
    """Make ``command`` the subcommand ``lympho-mil <name>``."""
    COMMANDS[name] = command


class LymphoCLI(LightningCLI):
    """LightningCLI with lympho-mil's subcommands, links, checkpoint policy and prediction
    files."""

    argv: list[str]  # the arguments parsed (the command line's, or those given)
    checkpoint_use: CheckpointUse | None = None  # set once a scoring command checked its own

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **{name: set() for name in COMMANDS}}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault(
            "dump_header", [f"lympho-mil=={__version__}", f"lightning.pytorch=={pl.__version__}"]
        )
        return super().init_parser(**kwargs)

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            self.parser.add_argument(
                "--version",
                action="version",
                version=f"lympho-mil {__version__}",
                help="Print lympho-mil's version and exit.",
            )
        else:  # one parser for the run alone (cv's folds, a config read for its data): a
            # config's command sections pass (an evaluate config's ckpt_path too)
            for name, command in COMMANDS.items():
                self.parser.add_class_arguments(command.options, name)
                if command.arguments is not None:
                    command.arguments(self.parser)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's four and the registered ones, each with lympho-mil's description."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        described = {**LIGHTNING_COMMANDS, **{n: c.description for n, c in COMMANDS.items()}}
        for name, description in described.items():
            settings = {"description": description, **kwargs.get(name, {})}
            subparser = self._prepare_subcommand_parser(Trainer, name, **settings)
            self._subcommand_parsers[name] = subparser
            subcommands.add_subcommand(name, subparser, help=description)

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        if subcommand in COMMANDS:
            parser = self.init_parser(**kwargs)
            self._add_arguments(parser)
            command = COMMANDS[subcommand]
            parser.add_class_arguments(command.options, subcommand)
            if command.arguments is not None:
                command.arguments(parser)
            self._subcommand_method_arguments[subcommand] = []
            return parser
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:
            if action.dest == "ckpt_path":
                action.help = CKPT_PATH_HELP[subcommand]
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threshold_policy",
            choices=THRESHOLD_POLICIES,
            default="inner_val",
            help="how fit (for its best checkpoint) and cv (for each fold's model) choose the "
            "decision threshold on the validation patients: inner_val maximises their "
            "balanced accuracy, fixed keeps model.threshold",
        )
        parser.add_argument(
            "--log_level",
            choices=LOG_LEVELS,
            default="info",
            help="info shows progress (decoding crops, extracting features, pretraining, cv "
            "folds) and lympho-mil's messages; warning or error hide them; debug shows all",
        )
        parser.link_arguments(
            "data.tabular_dim", "model.init_args.tabular_dim", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.tabular_stats", "model.init_args.tabular_stats", apply_on="instantiate"
        )
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        # ``last.ckpt`` refreshed every epoch (Lightning's ``save_last`` writes it only when a
        # best checkpoint is written), so a killed run resumes from its latest epoch.
        parser.add_lightning_class_args(RunCheckpoint, "last_checkpoint")
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
        self.argv = argv = sys.argv[1:] if args is None else args if isinstance(args, list) else []
        given = {a.split("=", 1)[0] for a in argv}
        subcommand = self.config.get("subcommand")
        self._asked_eval_settings = {
            key: self.config[subcommand]["model"]["init_args"][key]
            for key in EVAL_SETTINGS
            if subcommand and given & {f"--model.{key}", f"--model.init_args.{key}"}
        }
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self.ensemble = several_checkpoints(str(ckpt_path)) if ckpt_path else None
        if self.ensemble:
            if subcommand != "predict":
                raise ConfigError(f"{subcommand} takes one checkpoint; predict averages several")
            ckpt_path = self.config[subcommand]["ckpt_path"] = str(self.ensemble[0])
        if ckpt_path and is_file(str(ckpt_path)):
            read_checkpoint(ckpt_path)  # a file that is no checkpoint: one line, not a traceback
        model = self.config[subcommand].get("model") if subcommand else None
        class_path = getattr(model, "class_path", None)  # before a checkpoint's replaces it
        self.config_model = class_path.rpartition(".")[2] if class_path else None

    def _parse_ckpt_path(self) -> None:
        """Lightning's: the model settings of a ``--ckpt_path`` checkpoint replace the
        config's; those of a checkpoint of an earlier format as converted
        (`lympho_mil.models.checkpoint.upgrade`)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(upgrade(read_checkpoint(ckpt_path)).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        """The evaluation settings asked on the command line win over the checkpoint's, and
        ``--trainer.default_root_dir`` moves the default logger's ``runs/`` folder."""
        subcommand = self.config.get("subcommand")
        set_log_level(self.config[subcommand]["log_level"] if subcommand else "info")
        if subcommand in COMMANDS:
            return
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
        if subcommand in ("validate", "test"):
            _log_beside_an_earlier_run(logger)

    def instantiate_classes(self) -> None:
        if self.config.get("subcommand") in COMMANDS:
            return  # it builds what it needs itself
        super().instantiate_classes()
        share_cpu_with_loader_workers(self.trainer, self.datamodule)
        if "threshold" in self._asked_eval_settings:
            self.model.threshold_asked = True  # even the value the checkpoint was trained with
        self.runs_logger = self.trainer.logger  # where --ckpt_path last/best look for runs
        if self.subcommand not in (None, "fit"):
            trainer: Any = self.trainer  # Trainer.callbacks: set at run time, not in its types
            # scoring a checkpoint trains nothing: its checkpoint state is not restored
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
        if self.subcommand == "predict":
            self.trainer.loggers = []  # predict logs nothing: no empty version folder

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
        path = self.config_init[self.subcommand]["ckpt_path"]
        paths = self.ensemble or ([Path(path)] if is_file(str(path)) else [])
        if paths:
            self._check_and_announce(paths)

    before_validate = before_test = _require_checkpoint

    def _check_and_announce(self, paths: list[Path]) -> None:
        """Refuse a checkpoint of another model class or other data settings than the
        config's (one line naming both sides); then print the one line saying what is used:
        the checkpoint (or the fold ensemble), its model, training date and validation
        score, and the threshold."""
        infos, thresholds, replaced = [], [], None
        for path in paths:
            info = CheckpointInfo.read(path)
            differences = info.differences(self.config_model, self.datamodule.input_settings())
            if differences:
                saved = path.parent.parent / "config.yaml"
                hint = f"its run's {saved}" if saved.is_file() else "the config it was trained with"
                raise ConfigError(
                    f"the checkpoint {path} does not fit the config: {'; '.join(differences)} "
                    f"(checkpoint vs config); use {hint}, or set those options as the checkpoint's"
                )
            replaced = self.model.threshold_from(read_checkpoint(path))
            infos.append(info)
            thresholds.append(info.threshold if replaced is None else replaced)
        if not self.trainer.is_global_zero:
            return
        origin = (
            infos[0].threshold_origin()
            if replaced is None
            else "asked: --model.threshold"
            if self.model.threshold_asked
            else "the config's model.threshold"
        )
        ensemble = len(infos) > 1
        threshold = float(statistics.median(thresholds))
        if ensemble and replaced is None:
            origin = ensemble_threshold_rule(infos, threshold)
        line = (
            ensemble_line(infos, threshold, origin)
            if ensemble
            else infos[0].line(threshold, origin)
        )
        self.checkpoint_use = CheckpointUse(infos, threshold, origin, line)
        print(line, flush=True)

    def predict(self, **kwargs: Any) -> None:
        """Lightning's predict; with several checkpoints (``--ckpt_path`` a cv folder or a
        list) each predicts the patients, and the prediction files hold their average by the
        rule of cv's fold ensemble (mean probability, median threshold)."""
        trainer: Any = self.trainer  # Trainer.callbacks: set at run time, not in its types
        if not self.ensemble:
            trainer.predict(**kwargs)
            return
        writers = [c for c in trainer.callbacks if isinstance(c, PredictionWriter)]
        trainer.callbacks = [c for c in trainer.callbacks if c not in writers]
        runs = []
        for path in self.ensemble:
            batches = trainer.predict(**{**kwargs, "ckpt_path": str(path)})
            runs.append(gather_records([record for batch in batches for record in batch]))
        records, _ = ensemble_records([run[0]["threshold"] for run in runs], runs)
        for writer in writers:
            writer.write(trainer, self.model, records)

    def _set_seed(self) -> None:
        if self.subcommand not in COMMANDS:  # they seed what they build (cv: every fold)
            super()._set_seed()

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in COMMANDS:
            COMMANDS[subcommand].run(self)
            return
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_empty_run_folder()
            raise

    def _remove_empty_run_folder(self) -> None:
        """A run that failed before it logged anything leaves no ``version_N`` folder (only
        its config.yaml and hparams.yaml would be in it)."""
        log_dir = getattr(self.trainer.logger, "log_dir", None)
        folder = Path(log_dir) if log_dir else None
        if folder and folder.is_dir() and {p.name for p in folder.iterdir()} <= EMPTY_RUN:
            shutil.rmtree(folder)

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
        """``--ckpt_path last`` takes the ``last.ckpt`` of the newest run of the config's model
        class and data settings; ``--ckpt_path best`` (validate, test, predict) the best
        checkpoint that this last.ckpt records. Each run logs into a new ``version_N``
        folder, which holds no checkpoint yet, and Lightning alone would look only there and
        silently start from scratch (fit) or use untrained weights (``best`` it knows only
        within the run that trained)."""
        config = self.config_init[self.subcommand]
        name, callback = config.get("ckpt_path"), config.get("checkpoint")
        if name not in ("last", "best") or not isinstance(callback, ModelCheckpoint):
            return
        if name == "best" and self.subcommand == "fit":
            raise ConfigError("fit --ckpt_path best: resume from last, or pass a path")
        root = self.trainer.default_root_dir
        candidates = run_checkpoints(name, callback.dirpath, self.runs_logger, root)
        if candidates is None:
            return
        data = self.datamodule.input_settings()
        last = newest_matching(name, candidates, type(self.model).__name__, data).path
        if name == "best":
            last = recorded_best(last, callback.state_key, callback.monitor)
        config["ckpt_path"] = str(last)

    def after_fit(self) -> None:
        """Choose the decision threshold of the best checkpoint on the validation patients
        by ``--threshold_policy`` (cv's rule), store it in that checkpoint, and report its
        validation figures (the quickstart ends with these)."""
        trainer: Any = self.trainer  # Trainer.callbacks: set at run time, not in its types
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if not best or trainer.interrupted:
            return
        loggers, trainer.loggers = trainer.loggers, []  # not an epoch of the run's log
        callbacks = trainer.callbacks  # the user's prediction files are not these
        trainer.callbacks = [c for c in callbacks if not isinstance(c, PredictionWriter)]
        try:
            results = trainer.validate(self.model, self.datamodule, ckpt_path=best, verbose=False)
            # the validation loader alone: the datamodule would set up a predict split (and
            # data without unlabelled patients has none)
            trainer.datamodule = None
            batches = trainer.predict(self.model, self.datamodule.val_dataloader(), ckpt_path=best)
        finally:
            trainer.loggers, trainer.callbacks = loggers, callbacks
            trainer.datamodule = self.datamodule
        records = gather_records([record for batch in batches for record in batch])
        policy = self.config_init["fit"]["threshold_policy"]
        value, notes = choose_on_validation(policy, records, self.model.threshold_setting)
        if trainer.is_global_zero:
            store_threshold(Path(best), value, notes)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:  # under DDP: once
            return
        metrics = results[0] if results else {}
        chosen = notes["threshold"]
        how = (
            f"chosen on the {chosen['n_patients']} validation patients (threshold_policy "
            f"inner_val; their balanced accuracy {chosen['balanced_accuracy']:.3f} at it, "
            "optimistic: chosen on them)"
            if chosen["policy"] == "inner_val"
            else f"model.threshold kept ({chosen.get('reason', 'threshold_policy fixed')})"
        )
        print(
            f"best checkpoint: {best}\n"
            f"validation balanced accuracy: {metrics.get(MONITOR, float('nan')):.3f}  "
            f"AUROC: {metrics.get('val_auroc', float('nan')):.3f}\n"
            f"threshold: {value:.3f}, {how}; stored in the checkpoint"
        )


@contextmanager
def without_lightning_noise() -> Iterator[None]:
    """Silence Lightning's messages that mean nothing for lympho-mil's commands: its tips
    (cloud logging, model registry), its lines on restoring a checkpoint to score it (the
    command's own line names the checkpoint), a deprecation inside Lightning itself, and,
    when a command scores a checkpoint without the callbacks that wrote it (on purpose), the
    advice to add them."""
    noise = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tips = _DropMessages(
        "💡 Tip:", "Restoring states from the checkpoint", "Loaded model weights from the"
    )
    noise.addFilter(tips)
    with warnings.catch_warnings():
        for message in LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=message)
        try:
            yield
        finally:
            noise.removeFilter(tips)


@contextmanager
def quiet_build() -> Iterator[None]:
    """Without Lightning's lines on the devices it found (GPU, TPU, HPU): for a config built
    only to read its data, where they mean nothing (the run that trains or predicts says
    them)."""
    noise = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    devices = _DropMessages("GPU available", "TPU available", "HPU available")
    noise.addFilter(devices)
    try:
        yield
    finally:
        noise.removeFilter(devices)


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def _log_beside_an_earlier_run(logger: Any) -> None:
    """validate and test with a config that names a log folder holding a run (the
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
            if trainer.log_dir is not None and trainer.is_global_zero:
                check_folder_writable(trainer.log_dir)  # before anything is written there
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
        raise ConfigError(f"invalid config: {short_message(str(exc))}") from exc


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
        parser_class=LymphoParser,
        parser_kwargs={
            "prog": "lympho-mil",
            "description": DESCRIPTION,
            "epilog": "lympho-mil cv --help (any SUBCOMMAND --help) lists a subcommand's "
            "options; docs/cli.md explains them.",
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
        if not inspect.isabstract(cls):
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
