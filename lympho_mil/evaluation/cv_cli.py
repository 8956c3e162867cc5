"""``lympho-mil cv``: repeated patient-level cross-validation of one or several ``fit`` configs.

    lympho-mil cv --config CFG [--config CFG2 ...] [--folds K] [--repeats R] [--seed S]
                  [--out DIR] [--threshold-policy fixed|inner_val] [--inner-val-fraction F]
                  [--n-bootstrap B] [--predict] [--overwrite] [fit overrides ...]

Every argument it does not know (``--data.root PATH``, ``--trainer.max_epochs 3`` ...) goes
to each fold's ``fit`` config unchanged. Several ``--config`` are evaluated on identical
splits and compared with the first.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from lympho_mil.evaluation.bootstrap import DEFAULT_RESAMPLES
from lympho_mil.evaluation.cv import CVResult, compare_configs, cross_validate
from lympho_mil.evaluation.thresholds import THRESHOLD_POLICIES


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
