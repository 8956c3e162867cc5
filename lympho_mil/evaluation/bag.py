"""A bag fitted on every labelled patient: the model that ``cv --cv.inner_folds K`` measures.

The labelled patients are split into K stratified folds; member j is trained on the others
and keeps its checkpoint on fold j, as a member of a cross-validated bag does. The bag's
threshold is chosen by the threshold policy on the members' pooled validation predictions
(every patient once, by the member that did not train on it) and written into each member's
saved model, so ``lympho-mil predict --ckpt_path OUT`` (which averages the models it finds in
``OUT/folds/*/model.ckpt``, at the median of their thresholds) predicts as the bag.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lympho_mil.data.errors import DataError
from lympho_mil.data.splits import stratified_folds
from lympho_mil.evaluation.cv import labelled_patients, remove_outputs, run_folds
from lympho_mil.evaluation.cv_plan import BAG_REPORT, PLAN_FILE
from lympho_mil.evaluation.cv_types import CVSettings, FoldRun, FoldRunner, FoldSplit
from lympho_mil.evaluation.ensemble import pooled_choice
from lympho_mil.evaluation.report import REPORT_FILES
from lympho_mil.evaluation.thresholds import ThresholdPolicy
from lympho_mil.files import OutputExistsError, atomic_write_text, check_writable

PARTIAL = ".bag-partial"
"""Where the members train; renamed to ``folds`` once the bag is whole."""


@dataclass
class BagResult:
    """A fitted bag.

    members: each member's patients (``val_ids``: the fold it is validated on).
    run: the bag as one run: its threshold (chosen on the pooled validation predictions)
        and those predictions (``val``, each patient once).
    report: the content of ``bag_report.json``.
    out_dir: the folder of the report and the members' models (``folds/r0_f0_m<j>``).
    """

    members: list[FoldSplit]
    run: FoldRun
    report: dict[str, Any]
    out_dir: Path


def fit_bag(
    runner: FoldRunner,
    out_dir: str | Path,
    members: int = 5,
    seed: int = 0,
    threshold_policy: ThresholdPolicy = "inner_val",
    overwrite: bool = False,
    verbose: bool = True,
    name: str = "bag",
) -> BagResult:
    """Fit a bag of ``members`` models on every labelled patient of ``runner``'s data.

    Args:
        runner: builds each member's trainer, model and datamodule (`FoldRunner`).
        out_dir: where the members' models (``folds/r0_f0_m<j>/model.ckpt``) and
            ``bag_report.json`` go; an earlier bag there is refused unless ``overwrite``.
        members: K >= 2 stratified folds of the patients, one member validated on each.
        seed: seed of the folds; member j trains under ``seed + K * j``.
        threshold_policy: how the bag's threshold is chosen on the pooled validation
            predictions ("inner_val" or "fixed", as `cv`).
        overwrite: replace an earlier bag in ``out_dir``.
        verbose: print one line per member.
        name: the name its lines give it.
    """
    if members < 2:
        raise ValueError(f"a bag needs members >= 2, got {members}")
    settings = CVSettings(
        folds=members,
        seed=seed,
        threshold_policy=threshold_policy,
        verbose=verbose,
        inner_folds=members,
    )  # one "fold" of K members, no test patients: member seeds as a cv member's
    root = Path(out_dir)
    held = [root / n for n in (PLAN_FILE, *REPORT_FILES) if (root / n).exists()]
    if held:
        raise OutputExistsError(
            f"{root} holds a cross-validation ({held[0].name}); choose another output folder "
            "for the bag"
        )
    check_writable([root / BAG_REPORT, root / "folds"], overwrite, hint="--bag.overwrite true")
    ids, labels, _ = labelled_patients(runner, predict=False)
    try:
        parts = stratified_folds(ids, labels, members, seed)
    except ValueError as exc:
        raise DataError(
            f"cannot split {len(ids)} labelled patients into {members} folds: {exc}"
        ) from exc
    splits = [
        FoldSplit(0, 0, sorted(set(ids) - set(val)), val, [], member)
        for member, val in enumerate(parts)
    ]
    partial = root / PARTIAL  # a killed bag leaves no models that predict would average
    remove_outputs([partial])
    with _untested():
        (bag,) = run_folds(name, runner, splits, settings, partial / "folds", partial)
    _, notes = pooled_choice(threshold_policy, bag.val, members)
    remove_outputs([root / "folds", root / BAG_REPORT])  # only now: the new bag is whole
    (partial / "folds").rename(root / "folds")
    remove_outputs([partial])
    report = {
        "name": name,
        "members": members,
        "seed": seed,
        "n_patients": len(ids),
        "threshold": bag.threshold,
        "threshold_notes": notes,
        "models": [f"folds/r0_f0_m{m}/model.ckpt" for m in range(members)],
        "member_splits": [
            {"member": s.member, "train_ids": s.train_ids, "val_ids": s.val_ids} for s in splits
        ],
        "validation": [  # what the threshold was chosen on: each patient by its member
            {"id": r["id"], "label": r["label"], "probability": r["probability"]} for r in bag.val
        ],
        "seconds": round(bag.seconds, 2),
        **runner.record(),
    }
    atomic_write_text(root / BAG_REPORT, json.dumps(report, indent=1, default=str), True)
    return BagResult(splits, bag, report, root)


@contextmanager
def _untested() -> Iterator[None]:
    """Without the datamodule's warning that it tests on the validation patients: a member
    of a bag tests no one."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("no test patients configured")

    logger = logging.getLogger("lympho_mil.data.datamodule")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
