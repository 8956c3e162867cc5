"""Resuming ``lympho-mil cv``: its plan, written first, and the record of each finished fold.

A cross-validation with an output folder writes ``cv_plan.json`` before its first fold: the
settings, the splits, and per config a hash of its fold runner's settings (the command line's
runner: the resolved ``fit`` config) and a fingerprint of its data. Each fold run, once its
model is saved, writes ``fold_run.json`` beside it (the threshold and the predictions it
made). Run again with the same arguments after a kill, ``cv`` finds the plan of an unfinished
run, keeps the finished folds, trains the others and writes the report an uninterrupted run
would (the folds' times aside: each is the time it took when it ran). A plan that no longer
matches (another config, other data, other settings) is refused with a line naming what
changed; ``--cv.overwrite true`` (``overwrite=True``) starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lympho_mil.evaluation.cv_types import CVSettings, FoldRun, FoldRunner, FoldSplit
from lympho_mil.evaluation.report import COMPARISON_FILES, REPORT_FILES
from lympho_mil.files import OutputExistsError, atomic_write_text

if TYPE_CHECKING:
    from lympho_mil.data.datamodule import BagDataModule

PLAN_FILE = "cv_plan.json"
FOLD_FILE = "fold_run.json"
BAG_REPORT = "bag_report.json"  # `lympho_mil.evaluation.bag`'s; a cv claims it, a bag refuses cv's
PLAN_VERSION = 1
SHOWN_CHANGES = 3  # config keys named in the message; the rest are counted


class PlanChangedError(OutputExistsError):
    """The output folder holds an unfinished cross-validation planned otherwise."""


def fingerprint(runner: FoldRunner, datamodule: BagDataModule) -> dict[str, Any]:
    """What a fold run of ``runner`` depends on: ``resolved``, its settings as dotted keys
    (the runner's ``resolved_config()`` where it has one, as the command line's runner does:
    its resolved ``fit`` config, defaults included; else its flattened ``record()``);
    ``config``, their hash; ``data``, a hash of every patient of ``datamodule`` (id, label,
    clinical values, crop names) and, for image folders, of each crop file's size and time."""
    resolved_config = getattr(runner, "resolved_config", None)
    resolved = resolved_config() if callable(resolved_config) else flat(runner.record())
    digest = hashlib.sha256()
    paths_of = getattr(datamodule, "instance_paths", None)
    for bag in sorted(datamodule.bags.values(), key=lambda b: b.bag_id):
        described = [bag.bag_id, bag.label, list(bag.instance_ids), bag.tabular.tolist()]
        digest.update(json.dumps(described).encode())
        for path in paths_of(bag.bag_id) if paths_of is not None else ():
            stat = path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return {"config": _hash(resolved), "data": digest.hexdigest()[:24], "resolved": resolved}


def make_plan(
    settings: CVSettings, fingerprints: Mapping[str, dict[str, Any]], splits: Sequence[FoldSplit]
) -> dict[str, Any]:
    """The content of ``cv_plan.json``."""
    described = dataclasses.asdict(settings)
    described.pop("verbose")
    if described["patients"] is not None:
        described["patients"] = list(described["patients"])
    return {
        "version": PLAN_VERSION,
        "settings": described,
        "configs": dict(fingerprints),
        # a fold's one model (member None) is planned as before inner_folds existed
        "splits": [
            {k: v for k, v in dataclasses.asdict(s).items() if k != "member" or v is not None}
            for s in splits
        ],
    }


def unfinished_plan(root: Path | None, overwrite: bool) -> bool:
    """Whether to resume: ``root`` holds a plan whose report (``comparison.json`` for several
    configs, else ``cv_report.json``) was never written, and ``overwrite`` was not asked for.
    A finished run is refused as before (its report exists); ``overwrite`` starts afresh."""
    if root is None or overwrite or not (root / PLAN_FILE).is_file():
        return False
    try:
        several = len(json.loads((root / PLAN_FILE).read_text())["configs"]) > 1
    except (OSError, ValueError, KeyError, TypeError):
        return True  # start_or_resume says it cannot be read
    return not (root / (COMPARISON_FILES[0] if several else REPORT_FILES[0])).is_file()


def start_or_resume(root: Path, plan: dict[str, Any], resuming: bool, verbose: bool) -> None:
    """Write the plan of a new run into ``root``; when resuming, check that it is the one
    written there (`PlanChangedError` naming what changed)."""
    path = root / PLAN_FILE
    if not resuming:
        atomic_write_text(path, json.dumps(plan, indent=1, default=str), overwrite=True)
        return
    try:
        planned = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanChangedError(
            f"{path} cannot be read ({exc}); pass --cv.overwrite true (overwrite=True) to start "
            "afresh"
        ) from exc
    changes = _changes(planned, plan)
    if changes:
        raise PlanChangedError(
            f"{root} holds an unfinished cross-validation planned otherwise: "
            f"{'; '.join(changes)}; resume it with the arguments it was planned with, pass "
            "--cv.overwrite true (overwrite=True) to start afresh, or choose another --cv.out"
        )
    if verbose:
        print(f"resuming the cross-validation planned in {path}", flush=True)


def finished_fold(fold_dir: Path) -> FoldRun | None:
    """The fold run recorded in ``fold_dir`` by an earlier run, or None; the leftovers of a
    fold run that did not finish (logs, checkpoints) are removed: it runs again whole."""
    try:
        record = json.loads((fold_dir / FOLD_FILE).read_text())
    except (OSError, ValueError):
        shutil.rmtree(fold_dir, ignore_errors=True)
        return None
    return FoldRun(
        FoldSplit(**record["split"]),
        record["threshold"],
        record["val"],
        record["test"],
        record["unlabelled"],
        record["seconds"],
    )


def save_fold(fold_dir: Path, run: FoldRun) -> None:
    """Record a finished fold run in ``fold_dir`` (after its model: a fold with a record is
    whole)."""
    record = {"version": PLAN_VERSION, **dataclasses.asdict(run)}
    atomic_write_text(fold_dir / FOLD_FILE, json.dumps(record), overwrite=True)


def _changes(planned: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two plans, one phrase each."""
    if planned.get("version") != now["version"]:
        return [f"plan format {planned.get('version')} (this lympho-mil writes {now['version']})"]
    changes = [
        f"{_option(key)} {planned['settings'].get(key)!r} -> {value!r}"
        for key, value in now["settings"].items()
        if planned["settings"].get(key) != value
    ]
    before, after = planned["configs"], now["configs"]
    if list(before) != list(after):
        changes.append(f"the configs {list(before)} -> {list(after)}")
    for name in set(before) & set(after):
        if before[name]["config"] != after[name]["config"]:
            changes.append(f"the config of {name} ({_config_diff(before[name], after[name])})")
        if before[name]["data"] != after[name]["data"]:
            changes.append(f"the data of {name} (patients, labels, clinical values or crop files)")
    if not changes and planned["splits"] != now["splits"]:
        changes.append("the splits")
    return changes


def _option(setting: str) -> str:
    """How ``lympho-mil cv`` spells a `CVSettings` field (``patients``: Python only)."""
    if setting == "patients":
        return "patients"
    return "--threshold_policy" if setting == "threshold_policy" else f"--cv.{setting}"


def _config_diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    old, new = before["resolved"], after["resolved"]
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:SHOWN_CHANGES]]
    if len(keys) > SHOWN_CHANGES:
        shown.append(f"{len(keys) - SHOWN_CHANGES} more")
    return ", ".join(shown) or "its resolved content"


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}``."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    items: dict[str, Any] = {}
    for key, item in value.items():
        items.update(flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return items


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]
