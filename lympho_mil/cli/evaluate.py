"""``lympho-mil evaluate``: trained models scored on another labelled cohort (external
validation), with intervals, plots and a report a clinician opens in a browser.

    lympho-mil evaluate --config CFG --ckpt_path CKPT --data.root COHORT [--evaluate.out DIR]
                        [--evaluate.compare '[{config: CFG2, ckpt_path: CKPT2}, ...]']
                        [--evaluate.refit_threshold true] [--evaluate.n_bootstrap N]
                        [--evaluate.seed S] [--evaluate.explain true] [--evaluate.overwrite true]

evaluate parses as ``predict`` does, plus its ``--evaluate.*`` options (`EvaluateOptions`, or an
``evaluate:`` section of the config). Each model is a config and a checkpoint (``--ckpt_path``
takes what ``predict``'s does: a path, ``best``, ``last``, a cv folder or a list, the fold
ensemble); each runs the ``predict`` command on every patient of the cohort, with its checks
(a checkpoint that does not fit its config or the data is refused) and its one line, and
`lympho_mil.evaluation.external_cohort.evaluate_cohort` writes the report. Every other
argument (``--data.root PATH``, ``--trainer.accelerator cpu``) goes to every model's
``predict`` unchanged. `evaluate_checkpoints` does the same from Python.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from lightning.pytorch.cli import LightningArgumentParser

from lympho_mil.cli.app import (
    COMMANDS,
    Command,
    LymphoCLI,
    build_cli,
    register,
    without_lightning_noise,
)
from lympho_mil.cli.cv import QUIET_ARGS, ConfigRunner, config_and_overrides, config_names
from lympho_mil.cli.errors import ConfigError, is_file
from lympho_mil.evaluation.bootstrap import DEFAULT_RESAMPLES
from lympho_mil.evaluation.external_cohort import (
    check_outputs,
    cohort_patients,
    evaluate_cohort,
    montage_column,
)

CKPT_PATH_HELP = (
    "the checkpoint to evaluate, as predict takes it: a path, 'best' or 'last' (the newest run "
    "of the config's model and data), a cv output folder or a list '[a.ckpt, b.ckpt]' (the "
    "fold ensemble); one that does not fit the config or the data is refused"
)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class EvaluatedModel:
    """One model of an evaluation: a name (its folder under ``predictions/`` and its column
    in the report), its ``predict`` config and its checkpoint (as ``--ckpt_path`` takes it)."""

    name: str
    config: str
    ckpt_path: str


class CheckpointPredictor:
    """A `lympho_mil.evaluation.external_cohort.CohortPredictor` that runs the ``predict``
    command on a config and a checkpoint, with ``overrides`` (``["--data.root=PATH"]``).

    With ``explain``, montages are written where the model ranks crops (a model that reads
    them, a datamodule of image files); other models get none.
    """

    def __init__(
        self, config: str, ckpt_path: str, overrides: Sequence[str] = (), explain: bool = False
    ) -> None:
        self.config = config
        self.ckpt_path = ckpt_path
        self.overrides = list(overrides)
        self.explain = explain

    def predict(self, patient_ids: Sequence[str], output_dir: Path) -> tuple[pd.DataFrame, str]:
        explain = self.explain and ranks_crops(ConfigRunner(self.config, self.overrides).built())
        args = [
            "predict",
            "--config",
            predict_config(self.config),
            *QUIET_ARGS,
            *self.overrides,
            f"--ckpt_path={self.ckpt_path}",
            f"--data.predict_ids={json.dumps(list(patient_ids))}",
            f"--prediction.output_dir={output_dir}",
            "--prediction.overwrite=false",
            f"--prediction.explain={str(explain).lower()}",
        ]
        with warnings.catch_warnings(), without_lightning_noise():
            # evaluate passes args while sys.argv holds "evaluate"
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = build_cli(args)
        if cli.checkpoint_use is None:  # predict always checks its checkpoint first
            raise ConfigError(f"--ckpt_path {self.ckpt_path}: no checkpoint was used")
        table = pd.read_csv(output_dir / "predictions_detail.csv", dtype={"id": str})
        return montage_column(table, output_dir), cli.checkpoint_use.threshold_source()


def predict_config(config: str) -> str:
    """``config`` as ``predict`` reads it: the file, or, when it holds sections of lympho-mil's
    own subcommands (``evaluate:``, ``cv:``) or a ``ckpt_path`` (an evaluate config, as
    ``--print_config`` writes it), its content without them, inline."""
    if not is_file(config):
        return config
    content = yaml.safe_load(Path(config).read_text())
    own = {*COMMANDS, "ckpt_path"}
    if not isinstance(content, dict) or not own & set(content):
        return config
    return json.dumps({k: v for k, v in content.items() if k not in own})


def ranks_crops(cli: LymphoCLI) -> bool:
    """Whether the built config's model scores each crop of image files (montages possible)."""
    return bool(getattr(cli.model, "reads_instances", True)) and hasattr(
        cli.datamodule, "instance_paths"
    )


def evaluate_checkpoints(
    config: str | Path,
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    compare: Sequence[Mapping[str, str]] = (),
    name: str | None = None,
    explain: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate a checkpoint (and the ``compare`` ones, on the same patients) on the labelled
    cohort of the config's data (``--data.root`` among the ``overrides``), as ``lympho-mil
    evaluate`` does; returns the content of ``evaluation.json``.

    Args:
        config: the ``predict`` config of the model.
        ckpt_path: its checkpoint: a path, ``best``, ``last``, a cv folder or a list.
        out_dir: the output folder (report, figures, ``predictions/<model>/``).
        overrides: arguments for every model's ``predict``, e.g. ``["--data.root=PATH"]``;
            ``--data.predict_ids`` restricts the evaluation to those patients.
        compare: further models, each ``{"config": ..., "ckpt_path": ..., "name": ...}``
            (``name`` optional): scored on the same patients, with paired differences to the
            first.
        name: the first model's name (default: its config file's stem).
        explain: montages of the patients' crops, linked from the report, for the models
            that rank crops.
        **settings: those of `lympho_mil.evaluation.external_cohort.evaluate_cohort`
            (``refit_threshold``, ``referral_sensitivities``, ``n_bootstrap``, ``seed``,
            ``overwrite``, ``overwrite_hint``).
    """
    models = evaluated_models(str(config), str(ckpt_path), compare, name)
    hint = settings.get("overwrite_hint", "overwrite=True")
    check_outputs(out_dir, settings.get("overwrite", False), hint)  # before any work
    cohort = ConfigRunner(models[0].config, overrides).data()
    root = getattr(getattr(cohort, "source", None), "root", None)  # a DLMI folder's crops
    patients = cohort_patients(cohort.bags.values(), str(root or "the data"), cohort.predict_ids)
    same = [*overrides, f"--data.root={root}"] if root is not None else list(overrides)
    predictors = {  # every model on the first one's cohort, wherever its config points
        m.name: CheckpointPredictor(m.config, m.ckpt_path, same, explain) for m in models
    }
    return evaluate_cohort(predictors, patients, out_dir, **settings)


def evaluated_models(
    config: str, ckpt_path: str, compare: Sequence[Mapping[str, str]], name: str | None
) -> list[EvaluatedModel]:
    """The first model and the ``compare`` ones, named (distinct, safe as folder names);
    ConfigError for a compare entry without its config or checkpoint."""
    entries: list[Mapping[str, Any]] = [{"config": config, "ckpt_path": ckpt_path, "name": name}]
    for entry in compare:
        extra = set(entry) - {"config", "ckpt_path", "name"}
        if not isinstance(entry, Mapping) or extra or not entry.get("config"):
            raise ConfigError(
                f"--evaluate.compare: each model is {{config: CFG, ckpt_path: CKPT}} (and "
                f"optionally name), got {dict(entry)}"
            )
        if not entry.get("ckpt_path"):
            raise ConfigError(f"--evaluate.compare: {entry['config']} needs its ckpt_path")
        entries.append(entry)
    defaults = config_names([str(e["config"]) for e in entries])
    names: list[str] = []
    for entry, default in zip(entries, defaults, strict=True):
        base = _SAFE_NAME.sub("_", str(entry.get("name") or default)).strip("._") or "model"
        names.append(base if base not in names else f"{base}-{len(names)}")
    return [
        EvaluatedModel(n, str(e["config"]), str(e["ckpt_path"]))
        for n, e in zip(names, entries, strict=True)
    ]


@dataclass
class EvaluateOptions:
    """The options of ``lympho-mil evaluate`` (``--evaluate.<name>``, or an ``evaluate:``
    section of a config).

    Args:
        out: output folder of the report (evaluation.json/.md, report.html, the figures) and
            of each model's predictions (predictions/<model>/); never silently overwritten.
        overwrite: replace an earlier evaluation in ``out``.
        name: the --config model's name in the report (default: its config file's stem).
        compare: further models scored on the same patients, each {config: CFG, ckpt_path:
            CKPT} (optionally name: NAME), with paired differences to the first.
        refit_threshold: score each model at the threshold that maximises balanced accuracy
            on this cohort instead of its checkpoint's (optimistic; the report says so).
        n_bootstrap: patient bootstrap resamples of the intervals.
        seed: seed of the resamples (the same seed gives the same numbers).
        explain: write a montage of each patient's crops, linked from the report, for the
            models that rank crops (as predict --prediction.explain true).
    """

    out: str = "evaluation"
    overwrite: bool = False
    name: str | None = None
    compare: list[dict[str, str]] = field(default_factory=list)
    refit_threshold: bool = False
    n_bootstrap: int = DEFAULT_RESAMPLES
    seed: int = 0
    explain: bool = False

    def check(self) -> None:
        """ConfigError naming the first option out of its range."""
        if self.n_bootstrap < 1:
            raise ConfigError(
                f"--evaluate.n_bootstrap must be an integer >= 1, got {self.n_bootstrap}"
            )


def add_ckpt_path(parser: LightningArgumentParser) -> None:
    parser.add_argument("--ckpt_path", type=str | None, default=None, help=CKPT_PATH_HELP)


def run_evaluate(cli: LymphoCLI) -> None:
    """Run ``lympho-mil evaluate`` on the parsed command line: every argument but evaluate's
    own goes to each model's ``predict`` unchanged."""
    parsed = cli.config["evaluate"]
    options = EvaluateOptions(**parsed["evaluate"])
    options.check()
    if not parsed.get("ckpt_path"):
        raise ConfigError(
            "lympho-mil evaluate needs --ckpt_path (a checkpoint of `fit`, best, last, or the "
            "fold models of a `cv` run); without one it would score untrained weights"
        )
    args = cli.argv[cli.argv.index("evaluate") + 1 :]
    config, overrides = config_and_overrides(args, "evaluate", ("--ckpt_path",))
    report = evaluate_checkpoints(
        config,
        parsed["ckpt_path"],
        options.out,
        overrides=overrides,
        compare=options.compare,
        name=options.name,
        explain=options.explain,
        refit_threshold=options.refit_threshold,
        n_bootstrap=options.n_bootstrap,
        seed=options.seed,
        overwrite=options.overwrite,
        overwrite_hint="--evaluate.overwrite true",
    )
    for line in summary_lines(report):
        print(line)
    print(f"report: {Path(options.out) / 'report.html'} (and evaluation.json, evaluation.md)")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A line per model (balanced accuracy and AUROC with their intervals) and per paired
    difference."""

    def cell(s: dict[str, float], sign: str = "") -> str:
        f = f"{{:{sign}.3f}}"
        return f"{f.format(s['estimate'])} [{f.format(s['ci95_low'])}, {f.format(s['ci95_high'])}]"

    n = f"{report['n_patients']} patients ({report['n_tumoral']} tumoral)"
    lines = [
        f"{name} on {n}: balanced accuracy {cell(e['metrics']['balanced_accuracy'])}, "
        f"AUROC {cell(e['metrics']['auroc'])} at threshold {e['threshold']:.3f}"
        for name, e in report["models"].items()
    ]
    reference = report["comparison"]["reference"]
    for name, diff in report["comparison"]["differences"].items():
        lines.append(
            f"{name} - {reference}: balanced accuracy {cell(diff['balanced_accuracy'], '+')}, "
            f"AUROC {cell(diff['auroc'], '+')}"
        )
    return lines


register(
    "evaluate",
    Command(
        "score checkpoints on another labelled cohort: metrics with intervals, referral view, "
        "plots, paired comparison, a report.html",
        EvaluateOptions,
        run_evaluate,
        add_ckpt_path,
    ),
)
