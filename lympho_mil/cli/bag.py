"""``lympho-mil bag``: fit the bag that ``cv --cv.inner_folds K`` measures, on every labelled
patient, to predict new ones.

    lympho-mil bag --config CFG [--bag.members 5] [--bag.out DIR] [--bag.overwrite true]
                   [fit options ...]
    lympho-mil predict --config CFG --ckpt_path DIR     # the bag's mean, at its threshold

K members, each the ``fit`` command on the config (`ConfigRunner`) trained on K-1 of K
stratified folds of the labelled patients and validated on the last
(`lympho_mil.evaluation.bag.fit_bag`); the threshold (``--threshold_policy``) is chosen on
their pooled validation predictions and written into each member's model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lympho_mil.cli.app import Command, LymphoCLI, register
from lympho_mil.cli.cv import ConfigRunner, config_and_overrides, config_names
from lympho_mil.cli.errors import ConfigError
from lympho_mil.evaluation.bag import BAG_REPORT, fit_bag


@dataclass
class BagOptions:
    """The options of ``lympho-mil bag`` (``--bag.<name>``, or a ``bag:`` section).

    Args:
        members: K >= 2: the labelled patients' stratified folds, one member validated on
            each (its checkpoint) and trained on the others; K times a fit's training.
        seed: seed of the folds (member j trains under seed + K * j).
        out: the folder of the members' models (``folds/*/model.ckpt``, what ``predict
            --ckpt_path`` reads) and ``bag_report.json``.
        overwrite: replace an earlier bag in ``out``.
    """

    members: int = 5
    seed: int = 0
    out: str = "bag"
    overwrite: bool = False


def run_bag(cli: LymphoCLI) -> None:
    """Run ``lympho-mil bag`` on the parsed command line: every argument but bag's own goes to
    each member's ``fit`` unchanged."""
    parsed = cli.config["bag"]
    options = BagOptions(**parsed["bag"])
    if options.members < 2:
        raise ConfigError(f"--bag.members must be an integer >= 2, got {options.members}")
    config, overrides = config_and_overrides(cli.argv[cli.argv.index("bag") + 1 :], "bag")
    result = fit_bag(
        ConfigRunner(config, overrides),
        options.out,
        members=options.members,
        seed=options.seed,
        threshold_policy=parsed["threshold_policy"],
        overwrite=options.overwrite,
        name=config_names([config])[0],
    )
    chosen = result.report["threshold_notes"]["threshold"]
    how = (
        f"inner_val, chosen on their pooled validation predictions; balanced accuracy "
        f"{chosen['balanced_accuracy']:.3f} there, optimistic: chosen on them"
        if chosen["policy"] == "inner_val"
        else "fixed: the members' threshold setting"
    )
    print(
        f"bag of {options.members} models on {result.report['n_patients']} patients: "
        f"threshold {result.run.threshold:.3f} ({how})"
    )
    print(f"report: {Path(options.out) / BAG_REPORT}")
    print(f"predict with: lympho-mil predict --config {config} --ckpt_path {options.out}")


register(
    "bag",
    Command(
        "fit the bag that cv --cv.inner_folds measures on every labelled patient: K models, "
        "one threshold, for predict",
        BagOptions,
        run_bag,
    ),
)
