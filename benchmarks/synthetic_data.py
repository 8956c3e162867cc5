"""Benchmark the synthetic DLMI generator: write speed, clinical-only baseline, montage.

    python benchmarks/synthetic_data.py [--patients 200] [--size 224] [--out DIR]
                                        [--montage docs/images/synthetic_montage.png]

Prints one JSON line for the write time (wall clock and CPU time of this process, which
differ when the machine is shared) and one for a clinical-only logistic regression
(age, log lymphocyte count, sex) in repeated stratified 5-fold cross-validation over all
patients, test patients included through ``ground_truth.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lympho_mil.data.synthetic import ABNORMAL_KINDS, make_synthetic_dlmi

REFERENCE_DATE = datetime(2020, 1, 1)


def parse_dob(text: str) -> datetime:
    """The two DOB formats of the DLMI csvs: ``11/3/1933`` and ``27-08-1951``."""
    return datetime.strptime(text, "%d-%m-%Y" if "-" in text else "%m/%d/%Y")


def clinical_features(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Age, log lymphocyte count and sex of every patient, with the true labels."""
    table = pd.read_csv(root / "clinical_annotation.csv", index_col=0)
    truth = pd.read_csv(root / "ground_truth.csv").groupby("ID")["label"].first()
    age = table["DOB"].map(lambda s: (REFERENCE_DATE - parse_dob(s)).days / 365.25)
    male = table["GENDER"].str.upper().eq("M").astype(float)
    x = np.column_stack([age, np.log(table["LYMPH_COUNT"]), male])
    return x, table["ID"].map(truth).to_numpy()


def clinical_baseline(root: Path, folds: int = 5, repeats: int = 3) -> dict[str, object]:
    x, y = clinical_features(root)
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=0)
    scores = cross_val_score(model, x, y, cv=cv, scoring="balanced_accuracy")
    return {
        "name": "synthetic_clinical_logreg",
        "patients": len(y),
        "balanced_accuracy_mean": round(float(scores.mean()), 4),
        "balanced_accuracy_std": round(float(scores.std()), 4),
        "folds": folds,
        "repeats": repeats,
    }


def save_montage(root: Path, path: Path, per_row: int = 8, seed: int = 0) -> None:
    """One labelled row each: reactive normal, tumoral normal, then each abnormal kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = pd.read_csv(root / "ground_truth.csv")
    rows = [("reactive, normal", (truth.label == 0) & (truth.kind == "normal"))]
    rows.append(("tumoral, normal", (truth.label == 1) & (truth.kind == "normal")))
    rows += [(f"tumoral, {k}", (truth.label == 1) & (truth.kind == k)) for k in ABNORMAL_KINDS]
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(rows), per_row, figsize=(1.6 * per_row, 1.75 * len(rows)))
    for axrow, (title, keep) in zip(axes, rows, strict=True):
        picked = truth[keep].sample(frac=1.0, random_state=rng.integers(2**31))
        picked = picked.drop_duplicates("ID").head(per_row)  # one crop per patient
        for ax, cell in zip(axrow, picked.itertuples(), strict=False):
            ax.imshow(Image.open(root / cell.split / cell.ID / cell.file))
            ax.set_title(cell.ID, fontsize=7)
        for ax in axrow:
            ax.set_xticks([])
            ax.set_yticks([])
        axrow[0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72, pil_kwargs={"optimize": True})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="dataset folder (default: a temp dir)")
    parser.add_argument("--montage", type=Path, help="also save a montage PNG here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp) / "synthetic"
        start, cpu_start = time.perf_counter(), time.process_time()
        make_synthetic_dlmi(root, args.patients, args.size, args.seed, overwrite=True)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        images = len(pd.read_csv(root / "ground_truth.csv"))
        machine = f"{platform.platform()} {platform.machine()}, {os.cpu_count()} cpus"
        write = {"name": "synthetic_write", "patients": args.patients, "size": args.size}
        write |= {"images": images, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2)}
        write["machine"] = machine
        print(json.dumps(write))
        print(json.dumps(clinical_baseline(root)))
        if args.montage:
            save_montage(root, args.montage)


if __name__ == "__main__":
    main()
