"""``lympho-mil cv``: repeated patient-level cross-validation of one or several ``fit`` configs.

Each fold run is the ``fit`` command's LightningCLI (`ConfigRunner`) with the fold's patient
lists as overrides; `cross_validate` and `compare_configs` do the same from Python.

    lympho-mil cv --config CFG [--config CFG2 ...] [--folds K] [--repeats R] [--seed S]
                  [--out DIR] [--threshold-policy fixed|inner_val] [--inner-val-fraction F]
                  [--n-bootstrap B] [--predict] [--overwrite] [fit overrides ...]

Every argument it does not know (``--data.root PATH``, ``--trainer.max_epochs 3`` ...) goes
to each fold's ``fit`` config unchanged. Several ``--config`` are evaluated on identical
splits and compared with the first.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from lympho_mil.cli.app import build_cli
from lympho_mil.data.datamodule import BagDataModule
from lympho_mil.evaluation.bootstrap import DEFAULT_RESAMPLES
from lympho_mil.evaluation.cv import (
    Comparison,
    CVResult,
    FoldObjects,
    FoldSetup,
    run_comparison,
    run_cross_validation,
)
from lympho_mil.evaluation.predictions import PredictionWriter
from lympho_mil.evaluation.thresholds import THRESHOLD_POLICIES, ThresholdPolicy

ConfigSource = str | Path | dict[str, Any]
QUIET_ARGS = (
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
)
"""Defaults of a fold run that the user's overrides may still change."""


class ConfigRunner:
    """Each fold run is the ``fit`` command's LightningCLI on a config (a file, or the same
    content as a dict) and overrides (``["--data.root=PATH"]``), with the fold's patient
    lists, seed and folders as further overrides: any config that ``fit`` accepts works."""

    def __init__(self, config: ConfigSource, overrides: Sequence[str] = ()) -> None:
        self.config = config
        self.overrides = list(overrides)
        if isinstance(config, dict):
            self.source = ["--config", json.dumps(config)]
        elif Path(config).is_file():
            self.source = ["--config", str(config)]
        else:
            raise FileNotFoundError(f"config file not found: {config}")

    def _cli(self, extra: Sequence[str]) -> Any:
        with warnings.catch_warnings():  # cv passes args while sys.argv holds "cv"
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            args = [*self.source, *QUIET_ARGS, *self.overrides, *extra]
            return build_cli(args, run=False)

    def data(self) -> BagDataModule:
        return self._cli(["--trainer.logger=false", "--seed_everything=false"]).datamodule

    def build(self, setup: FoldSetup) -> FoldObjects:
        cli = self._cli(fold_args(setup))
        trainer = cli.trainer
        # cv writes its own prediction files; the CLI's writer would fire on every predict.
        # (Trainer.callbacks is set by Lightning at run time but missing from its types.)
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        kept = [c for c in callbacks if not isinstance(c, PredictionWriter)]
        trainer.callbacks = kept  # type: ignore[attr-defined]
        return FoldObjects(trainer, cli.model, cli.datamodule)

    def record(self) -> dict[str, Any]:
        return {"config": config_record(self.config), "overrides": self.overrides}


def fold_args(setup: FoldSetup) -> list[str]:
    """The ``fit`` overrides of one fold run."""
    split, fold_dir = setup.split, setup.directory
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(fold_dir), "name": "", "version": ""},
    }
    args = [
        f"--seed_everything={setup.seed}",
        f"--data.train_ids={json.dumps(split.train_ids)}",
        f"--data.val_ids={json.dumps(split.val_ids)}",
        f"--data.test_ids={json.dumps(split.test_ids)}",
        f"--trainer.default_root_dir={fold_dir}",
        f"--trainer.logger={json.dumps(logger)}",
        f"--checkpoint.dirpath={fold_dir / 'checkpoints'}",
        "--checkpoint.save_last=false",
    ]
    if setup.predict_ids is not None:
        args.append(f"--data.predict_ids={json.dumps(setup.predict_ids)}")
    return args


def config_record(config: ConfigSource) -> dict[str, Any]:
    """What a report records about a config: its file and content."""
    if isinstance(config, dict):
        return {"source": "dict", "content": config}
    return {"source": str(config), "content": yaml.safe_load(Path(config).read_text())}


def config_names(configs: Sequence[ConfigSource]) -> list[str]:
    """A distinct folder name per config: the file's stem, or ``config<i>`` for a dict."""
    names: list[str] = []
    for i, config in enumerate(configs):
        base = f"config{i}" if isinstance(config, dict) else Path(config).stem
        names.append(base if base not in names else f"{base}-{i}")
    return names


def cross_validate(
    config: ConfigSource,
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    out_dir: str | Path | None = None,
    threshold_policy: ThresholdPolicy = "inner_val",
    inner_val_fraction: float = 0.2,
    overrides: Sequence[str] | None = None,
    predict: bool = False,
    overwrite: bool = False,
    n_bootstrap: int = DEFAULT_RESAMPLES,
    verbose: bool = True,
    patients: Sequence[str] | None = None,
) -> CVResult:
    """Repeated stratified patient-level k-fold cross-validation of a ``fit`` config.

    Args:
        config: a ``fit`` config file, or the same content as a dict.
        overrides: extra ``fit`` arguments, e.g. ``["--trainer.max_epochs=3"]``.
        **others: as `run_cross_validation` (folds, repeats, seed, out_dir,
            threshold_policy, inner_val_fraction, predict, overwrite, n_bootstrap, verbose,
            patients).
    """
    return run_cross_validation(
        ConfigRunner(config, overrides or ()),
        folds,
        repeats,
        seed,
        out_dir,
        threshold_policy,
        inner_val_fraction,
        predict,
        overwrite,
        n_bootstrap,
        verbose,
        patients,
        name=config_names([config])[0],
    )


def compare_configs(
    configs: Sequence[ConfigSource] | Mapping[str, ConfigSource],
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    out_dir: str | Path | None = None,
    threshold_policy: ThresholdPolicy = "inner_val",
    inner_val_fraction: float = 0.2,
    overrides: Sequence[str] | None = None,
    predict: bool = False,
    overwrite: bool = False,
    n_bootstrap: int = DEFAULT_RESAMPLES,
    verbose: bool = True,
    patients: Sequence[str] | None = None,
) -> Comparison:
    """Cross-validate several configs on identical splits; compare each with the first.

    ``configs`` maps names to configs, or is a list (names from `config_names`). Each
    config's outputs go to ``out_dir/<name>/``, the paired table to
    ``out_dir/comparison.json`` and ``comparison.md``. Other arguments as `cross_validate`.
    """
    named = (
        dict(configs)
        if isinstance(configs, Mapping)
        else dict(zip(config_names(configs), configs, strict=True))
    )
    if len(named) < 2:
        raise ValueError("compare_configs needs at least two configs")
    runners = {name: ConfigRunner(config, overrides or ()) for name, config in named.items()}
    return run_comparison(
        runners,
        folds,
        repeats,
        seed,
        out_dir,
        threshold_policy,
        inner_val_fraction,
        predict,
        overwrite,
        n_bootstrap,
        verbose,
        patients,
    )


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The options of ``lympho-mil cv`` (the rest of the command line goes to ``fit``)."""
    parser = argparse.ArgumentParser(
        prog="lympho-mil cv",
        description=(
            "Repeated stratified patient-level cross-validation with inner validation for "
            "checkpoint and threshold, bootstrap CIs, fold ensembles and paired comparison. "
            "Unknown arguments (e.g. --data.root PATH) are passed to every fold's fit config."
        ),
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="a fit config (repeat it to compare several models on identical splits)",
    )
    parser.add_argument("--folds", type=at_least(2), default=5, help="outer folds K (default 5)")
    parser.add_argument("--repeats", type=at_least(1), default=1, help="repeats R (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="repeat r shuffles with seed + r")
    parser.add_argument("--out", default="cv", help="output folder (default ./cv)")
    parser.add_argument(
        "--threshold-policy",
        choices=THRESHOLD_POLICIES,
        default="inner_val",
        help="fixed: the config's model.threshold (0.5 by default); inner_val: maximise "
        "balanced accuracy on inner validation (default)",
    )
    parser.add_argument(
        "--inner-val-fraction",
        type=float,
        default=0.2,
        help="share of each outer training set held out for checkpoint and threshold",
    )
    parser.add_argument(
        "--n-bootstrap",
        type=at_least(1),
        default=DEFAULT_RESAMPLES,
        help=f"patient bootstrap resamples for the CIs (default {DEFAULT_RESAMPLES})",
    )
    parser.add_argument(
        "--predict",
        action="store_true",
        help="also write the fold ensemble's predictions of the unlabelled patients",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    return parser


FIT_OPTIONS = (
    "trainer",
    "model",
    "data",
    "checkpoint",
    "last_checkpoint",
    "prediction",
    "optimizer",
    "lr_scheduler",
    "seed_everything",
    "c",  # -c FILE: another config layered on every fold's (as --config is to fit)
)
"""The ``fit`` options that ``cv`` passes on (``--<name>`` or ``--<name>.<key>``)."""


def cv_main(argv: list[str]) -> None:
    """Run ``lympho-mil cv`` with the arguments that follow ``cv``."""
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    _check_fit_options(parser, overrides)
    common = {
        "folds": args.folds,
        "repeats": args.repeats,
        "seed": args.seed,
        "out_dir": args.out,
        "threshold_policy": args.threshold_policy,
        "inner_val_fraction": args.inner_val_fraction,
        "overrides": overrides,
        "predict": args.predict,
        "overwrite": args.overwrite,
        "n_bootstrap": args.n_bootstrap,
    }
    if len(args.config) == 1:
        result = cross_validate(args.config[0], **common)
        assert result.out_dir is not None  # --out always names a folder (default ./cv)
        print(_summary_line(result))
        print(f"report: {result.out_dir / 'cv_report.md'}")
        return
    comparison = compare_configs(args.config, **common)
    for result in comparison.results:
        print(_summary_line(result))
    reference = comparison.table["reference"]
    for name, diff in comparison.table["difference"].items():
        d = diff["balanced_accuracy"]
        print(
            f"{name} - {reference}: balanced accuracy {d['mean']:+.3f} "
            f"[{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]"
        )
    print(f"comparison: {Path(args.out) / 'comparison.md'}")


def _check_fit_options(parser: argparse.ArgumentParser, overrides: list[str]) -> None:
    """Name an option that is neither cv's nor one of the fit options it passes on (a typo
    such as ``--fold``); the word after an option without ``=`` is its value."""
    value_next = False
    for arg in overrides:
        if value_next or not arg.startswith("-"):
            value_next = False
            continue
        key = arg.split("=", 1)[0]
        name = key.lstrip("-").split(".")[0]
        if name in ("ckpt_path", "print_config"):
            parser.error(f"{key} does not apply to cv: it trains every fold's model itself")
        if name not in FIT_OPTIONS:
            parser.error(
                f"unknown option {key}: neither a cv option (lympho-mil cv --help) nor a fit "
                "option (--trainer.*, --model.*, --data.*, ...) to pass on"
            )
        value_next = "=" not in arg


def _summary_line(result: CVResult) -> str:
    parts = []
    for metric, label in (("balanced_accuracy", "balanced accuracy"), ("auroc", "AUROC")):
        s = result.report[metric]
        parts.append(f"{label} {s['mean']:.3f} [{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]")
    r = result.report
    return f"{result.name} ({r['folds']} folds x {r['repeats']} repeats): " + ", ".join(parts)
