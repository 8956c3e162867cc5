"""Repeated cross-validation of the clinical-only TabularMLP on a DLMI folder (e.g. dlmi-dev).

    python benchmarks/cv_tabular.py --data ../shared/data/dlmi-dev [--folds 5] [--repeats 3]
        [--config examples/configs/tabular_mlp.yaml] [--out DIR] [--cache-dir DIR]

Runs :func:`lympho_mil.cross_validate` (inner validation picks checkpoint and
threshold) and, on the very same outer splits, a clinical-only logistic regression as the
reference. Prints one JSON line: each one's balanced accuracy and AUROC with their 95%
patient-bootstrap intervals, wall and CPU time of this process, and the machine. The fold
lines go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mil_common import machine
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lympho_mil import cross_validate
from lympho_mil.data import PatientBagDataModule
from lympho_mil.evaluation import CVResult, metric_summary

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tabular_mlp.yaml"
REPORTED = ("balanced_accuracy", "auroc")


def logistic_reference(result: CVResult, data: Path, seed: int, n_bootstrap: int) -> dict:
    """Clinical-only logistic regression on the outer splits of ``result`` (trained on the
    training + inner validation patients, balanced class weights, threshold 0.5)."""
    bags = PatientBagDataModule(str(data)).bags
    rows = []
    for fold in result.report["per_fold"]:
        train = fold["train_ids"] + fold["val_ids"]
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
        model.fit(np.stack([bags[i].tabular for i in train]), [bags[i].label for i in train])
        test = np.stack([bags[i].tabular for i in fold["test_ids"]])
        for pid, prob in zip(fold["test_ids"], model.predict_proba(test)[:, 1], strict=True):
            rows.append(
                {
                    "repeat": fold["repeat"],
                    "id": pid,
                    "label": bags[pid].label,
                    "probability": prob,
                    "predicted": int(prob >= 0.5),
                }
            )
    summary = metric_summary(pd.DataFrame(rows), n_bootstrap, seed)
    return {name: summary[name] for name in REPORTED}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a DLMI folder")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, help="keep the cv outputs here (default: discard)")
    parser.add_argument("--cache-dir", help="decoded-crop cache (default: the library's)")
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    args = parser.parse_args()

    overrides = [f"--data.root={args.data}"]
    if args.cache_dir:
        overrides.append(f"--data.cache_dir={args.cache_dir}")
    where = machine()
    wall, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        result = cross_validate(
            args.config,
            folds=args.folds,
            repeats=args.repeats,
            seed=args.seed,
            out_dir=args.out or Path(scratch) / "cv",
            overrides=overrides,
            overwrite=args.out is not None,
            n_bootstrap=args.n_bootstrap,
        )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report = result.report
    line = {
        "benchmark": "cv_tabular",
        "data": str(args.data),
        "config": str(args.config),
        "n_patients": report["n_patients"],
        "folds": report["folds"],
        "repeats": report["repeats"],
        "threshold_policy": report["threshold_policy"],
        **{name: report[name] for name in REPORTED},
        "logistic_regression_same_splits": logistic_reference(
            result, args.data, args.seed, args.n_bootstrap
        ),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "machine": where,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
