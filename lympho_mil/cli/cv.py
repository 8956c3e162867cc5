"""``lympho-mil cv``: repeated patient-level cross-validation of one or several ``fit`` configs.

    lympho-mil cv --config CFG [--cv.folds K] [--cv.repeats R] [--cv.out DIR]
                  [--cv.compare '[CFG2, ...]'] [--cv.predict true] [fit options ...]

cv parses as ``fit`` does, plus its ``--cv.*`` options (`CVOptions`, or a ``cv:`` section of
the config); every other argument (``--data.root PATH``, ``--trainer.max_epochs 3``) goes to
each fold's ``fit`` unchanged. Each fold run is the ``fit`` command's LightningCLI
(`ConfigRunner`) with the fold's patient lists as overrides; `cross_validate` and
`compare_configs` do the same from Python.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from lympho_mil.cli.app import COMMANDS, Command, LymphoCLI, build_cli, quiet_build, register
from lympho_mil.cli.errors import ConfigError
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
from lympho_mil.evaluation.cv_plan import flat
from lympho_mil.evaluation.predictions import PredictionWriter

ConfigSource = str | Path | dict[str, Any]
QUIET_ARGS = (
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
)
"""Defaults of a fold run that the user's overrides may still change."""
DATA_ARGS = ("--trainer.logger=false", "--seed_everything=false")
"""What the config is built with to read its data (nothing is trained or logged)."""
COMPARE_EXAMPLES = {
    "cv": " '[B.yaml, C.yaml]'",
    "evaluate": " '[{config: B.yaml, ckpt_path: B.ckpt}]'",
}


class ConfigRunner:
    """Each fold run is the ``fit`` command's LightningCLI on a config (a file, or the same
    content as a dict) and overrides (``["--data.root=PATH"]``), with the fold's patient
    lists, seed and folders as further overrides: any config that ``fit`` accepts works."""

    def __init__(self, config: ConfigSource, overrides: Sequence[str] = ()) -> None:
        self.config = config
        self.overrides = list(overrides)
        self._resolved: dict[str, Any] | None = None
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
        return self.built().datamodule

    def built(self) -> LymphoCLI:
        """The config built to read its data (its model and datamodule; nothing is trained
        or logged)."""
        with quiet_build():
            cli = self._cli(DATA_ARGS)
        self._resolved = resolved_config(cli)
        return cli

    def resolved_config(self) -> dict[str, Any]:
        """The resolved ``fit`` config of the folds (`resolved_config`): what a resumed
        ``cv`` compares with its plan (``lympho_mil.evaluation.cv_plan``)."""
        if self._resolved is None:  # cv reads the data first, and keeps it from there
            self._resolved = resolved_config(self._cli(DATA_ARGS))
        return self._resolved

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
        f"--data.split.train_ids={json.dumps(split.train_ids)}",
        f"--data.split.val_ids={json.dumps(split.val_ids)}",
        f"--data.split.test_ids={json.dumps(split.test_ids)}",
        f"--trainer.default_root_dir={fold_dir}",
        f"--trainer.logger={json.dumps(logger)}",
        f"--checkpoint.dirpath={fold_dir / 'checkpoints'}",
        "--checkpoint.save_last=false",
    ]
    if setup.predict_ids is not None:
        args.append(f"--data.predict_ids={json.dumps(setup.predict_ids)}")
    return args


def resolved_config(cli: LymphoCLI) -> dict[str, Any]:
    """Every setting of a built config as dotted keys, defaults included: the config files'
    paths left out (their content is in the rest), and so are the sections of cv and other
    subcommands and ``threshold_policy`` (cross-validation settings, not the fold's fit)."""
    resolved = flat(yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)))
    own = tuple(f"{name}." for name in COMMANDS)
    return {
        key: value
        for key, value in resolved.items()
        if key not in ("config", "threshold_policy") and not key.startswith(own)
    }


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
    config: ConfigSource, *, overrides: Sequence[str] | None = None, **settings: Any
) -> CVResult:
    """Repeated stratified patient-level k-fold cross-validation of a ``fit`` config, each
    fold run as the ``fit`` command (`ConfigRunner`).

    Args:
        config: a ``fit`` config file, or the same content as a dict.
        overrides: extra ``fit`` arguments, e.g. ``["--trainer.max_epochs=3"]``.
        **settings: those of `run_cross_validation` (``folds``, ``repeats``, ``seed``,
            ``out_dir``, ``threshold_policy``, ``inner_val_fraction``, ``inner_folds``,
            ``predict``, ``overwrite``, ``n_bootstrap``, ``verbose``, ``patients``).
    """
    runner = ConfigRunner(config, overrides or ())
    return run_cross_validation(runner, **{"name": config_names([config])[0], **settings})


def compare_configs(
    configs: Sequence[ConfigSource] | Mapping[str, ConfigSource],
    *,
    overrides: Sequence[str] | None = None,
    **settings: Any,
) -> Comparison:
    """Cross-validate several configs on identical splits; compare each with the first.

    ``configs`` maps names to configs, or is a list (names from `config_names`). Each
    config's outputs go to ``out_dir/<name>/``, the paired table to
    ``out_dir/comparison.json`` and ``comparison.md``. ``overrides`` go to every config;
    ``settings`` are those of `run_comparison`.
    """
    named = (
        dict(configs)
        if isinstance(configs, Mapping)
        else dict(zip(config_names(configs), configs, strict=True))
    )
    if len(named) < 2:
        raise ValueError("compare_configs needs at least two configs")
    runners = {name: ConfigRunner(config, overrides or ()) for name, config in named.items()}
    return run_comparison(runners, **settings)


@dataclass
class CVOptions:
    """The options of ``lympho-mil cv`` (``--cv.<name>``, or a ``cv:`` section of a config).

    Args:
        folds: outer folds K (at least 2).
        repeats: repeats R; repeat r shuffles the patients with seed + r.
        seed: seed of the splits (each fold trains under its own seed, derived from it).
        out: output folder of the report, predictions, plots and fold models.
        inner_val_fraction: share of each outer training set held out as inner validation,
            for the checkpoint and the threshold.
        inner_folds: K >= 2 trains K models a fold instead of one (a bagged fold): model j is
            validated on the j-th of K stratified inner folds of the fold's training patients
            (its checkpoint) and trained on the others; the fold predicts their mean
            probability, at a threshold chosen on their pooled validation predictions (every
            training patient once, not one fifth). K times the training; inner_val_fraction
            is then unused.
        n_bootstrap: patient bootstrap resamples for the confidence intervals.
        predict: also write the fold ensemble's predictions of the patients to predict (the
            unlabelled ones, or --data.predict_ids, which then stay out of the folds).
        overwrite: replace an earlier run's outputs in ``out``.
        compare: further fit configs, cross-validated on the same splits (with the same
            overrides) and compared with the first, the --config one.
    """

    folds: int = 5
    repeats: int = 1
    seed: int = 0
    out: str = "cv"
    inner_val_fraction: float = 0.2
    inner_folds: int | None = None
    n_bootstrap: int = DEFAULT_RESAMPLES
    predict: bool = False
    overwrite: bool = False
    compare: list[str] = field(default_factory=list)

    def check(self) -> None:
        """ConfigError naming the first option out of its range."""
        for name, low in (("folds", 2), ("repeats", 1), ("n_bootstrap", 1)):
            value = getattr(self, name)
            if value < low:
                raise ConfigError(f"--cv.{name} must be an integer >= {low}, got {value}")
        if not 0.0 < self.inner_val_fraction < 1.0:
            raise ConfigError(
                f"--cv.inner_val_fraction must be in (0, 1), got {self.inner_val_fraction}"
            )
        if self.inner_folds is not None and self.inner_folds < 2:
            raise ConfigError(
                f"--cv.inner_folds must be an integer >= 2 (or null), got {self.inner_folds}"
            )


def run_cv(cli: LymphoCLI) -> None:
    """Run ``lympho-mil cv`` on the parsed command line: every argument but cv's own goes to
    each fold's ``fit`` unchanged."""
    parsed = cli.config["cv"]
    options = CVOptions(**parsed["cv"])
    options.check()
    config, overrides = config_and_overrides(cli.argv[cli.argv.index("cv") + 1 :])
    common: dict[str, Any] = {
        "folds": options.folds,
        "repeats": options.repeats,
        "seed": options.seed,
        "out_dir": options.out,
        "threshold_policy": parsed["threshold_policy"],
        "inner_val_fraction": options.inner_val_fraction,
        "inner_folds": options.inner_folds,
        "overrides": overrides,
        "predict": options.predict,
        "overwrite": options.overwrite,
        "n_bootstrap": options.n_bootstrap,
    }
    if not options.compare:
        result = cross_validate(config, **common)
        print(_summary_line(result))
        print(f"report: {Path(options.out) / 'cv_report.md'}")
        return
    comparison = compare_configs([config, *options.compare], **common)
    for result in comparison.results:
        print(_summary_line(result))
    reference = comparison.table["reference"]
    for name, diff in comparison.table["difference"].items():
        d = diff["balanced_accuracy"]
        print(
            f"{name} - {reference}: balanced accuracy {d['mean']:+.3f} "
            f"[{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]"
        )
    print(f"comparison: {Path(options.out) / 'comparison.md'}")


def config_and_overrides(
    args: Sequence[str], command: str = "cv", own: Sequence[str] = ("--threshold_policy",)
) -> tuple[str, list[str]]:
    """The config of cv's folds (the first ``--config``/``-c``) and the other arguments,
    less cv's own options (``--cv.*``, ``--threshold_policy``): the folds' fit overrides.
    A value follows its option after ``=`` or as the next word. ``command`` and ``own``
    name another subcommand's section and further options (``evaluate``: ``--ckpt_path``)."""
    config: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        key, equals, value = args[i].partition("=")
        has_next = not equals and i + 1 < len(args) and not args[i + 1].startswith("--")
        if has_next:
            value = args[i + 1]
        words = args[i : i + 1 + has_next]
        i += 1 + has_next
        if key in ("--config", "-c") and config is None:
            config = value
        elif key == "--config":
            compare = (
                f"; compare configs with --{command}.compare{COMPARE_EXAMPLES[command]}"
                if command in COMPARE_EXAMPLES
                else ""
            )
            raise ConfigError(
                f"{command} takes one --config{compare} (use -c to layer a further config on "
                "it, as fit does)"
            )
        elif key not in (f"--{command}", *own) and not key.startswith(f"--{command}."):
            overrides += words
    if config is None:
        what = {"cv": "the fit config to cross-validate", "bag": "the fit config to bag"}.get(
            command, "the model's config"
        )
        raise ConfigError(f"{command} needs --config: {what}")
    return config, overrides


register(
    "cv",
    Command(
        "cross-validate fit configs: repeated patient-level folds, bootstrap intervals, "
        "fold ensembles, paired comparison",
        CVOptions,
        run_cv,
    ),
)


def _summary_line(result: CVResult) -> str:
    parts = []
    for metric, label in (("balanced_accuracy", "balanced accuracy"), ("auroc", "AUROC")):
        s = result.report[metric]
        parts.append(f"{label} {s['mean']:.3f} [{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]")
    r = result.report
    return f"{result.name} ({r['folds']} folds x {r['repeats']} repeats): " + ", ".join(parts)
