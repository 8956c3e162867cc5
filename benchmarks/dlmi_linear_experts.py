"""A study, not a recipe: regularised logistic experts on patient-level statistics.

    OMP_NUM_THREADS=1 python benchmarks/dlmi_linear_experts.py [--data DLMI_FOLDER]

The recipe's morphology features (examples/configs/dlmi.yaml: 33 per crop, 112 px centres)
are pooled per patient (mean, or mean and standard deviation of each feature); a
scikit-learn logistic regression on them (L2 strength ``C``, balanced class weights,
features z-scored on the training patients) is the image expert, one on the clinical vector
(age, log lymphocyte count, sex; ``C = 1``) the clinical expert, and the prediction is the
sum of their logits (a product of experts). Every model runs on the splits of
``lympho-mil cv`` (5 folds x 3 repeats, seeds 0-2) under two protocols:

- ``all_train``: fit on all the outer training patients, threshold 0.5;
- ``inner_val``: the library's protocol: fit on 80 % of them, threshold chosen on the other
  20 % (:func:`~lympho_mil.evaluation.thresholds.best_balanced_accuracy_threshold`).

JSON lines per model and protocol: balanced accuracy and AUROC (mean over repeats, 95 %
patient-bootstrap CI) and the paired difference to the clinical expert alone. Every ``C``
of the grid is printed: the grid was looked at on these very folds, so no row is an
estimate of a tuned model (docs/results.md, fourth round).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import yaml
from dlmi_recipe import CONFIGS, METRICS, interval
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from speed_common import emit, parser, quiet

from lympho_mil.data import CachedFeatureDataModule
from lympho_mil.data.splits import holdout_split, stratified_folds
from lympho_mil.evaluation.bootstrap import metric_summary, paired_difference
from lympho_mil.evaluation.thresholds import best_balanced_accuracy_threshold

Expert = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train, test) masks -> logits
GRID = (0.03, 0.1, 0.3, 1.0)


def patient_table(root: str, cache_dir: str | None) -> tuple[list[str], np.ndarray, dict]:
    """Patient ids, labels, clinical vectors and the pooled crop features (cached extraction)."""
    args = yaml.safe_load((CONFIGS / "dlmi.yaml").read_text())["data"]["init_args"]
    dm = CachedFeatureDataModule(**{**args, "root": root, "cache_dir": cache_dir})
    store, _ = dm.build_store(list(dm.bags.values()))
    ids = sorted(i for i, b in dm.bags.items() if b.label in (0, 1))
    crops = [np.asarray(store[np.sort(dm.bags[i].rows)], np.float32).mean(axis=1) for i in ids]
    pooled = {
        "mean": np.stack([c.mean(axis=0) for c in crops]),
        "mean_std": np.stack([np.concatenate([c.mean(axis=0), c.std(axis=0)]) for c in crops]),
        "clinical": np.stack([dm.bags[i].tabular for i in ids]),
    }
    return ids, np.array([dm.bags[i].label for i in ids]), pooled


def logistic(x: np.ndarray, y: np.ndarray, c: float) -> Expert:
    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
        )
        return model.fit(x[train], y[train]).decision_function(x[test])

    return fit_predict


def out_of_fold(
    experts: list[Expert], ids: list[str], y: np.ndarray, protocol: str
) -> pd.DataFrame:
    """OOF rows (``repeat, id, label, probability, predicted``) of the summed experts."""
    ids_arr, rows = np.array(ids), []
    for repeat in range(3):
        for test_ids in stratified_folds(ids, y, 5, repeat):
            test = np.isin(ids_arr, test_ids)
            train, threshold = ~test, 0.5
            if protocol == "inner_val":
                fit_ids, val_ids = holdout_split(ids_arr[~test], y[~test], 0.2, repeat)
                train, val = np.isin(ids_arr, fit_ids), np.isin(ids_arr, val_ids)
                val_prob = expit(sum(e(train, val) for e in experts))
                threshold = best_balanced_accuracy_threshold(val_prob, y[val])
            prob = expit(sum(e(train, test) for e in experts))
            rows += [
                (repeat, i, int(label), float(p), int(p >= threshold))
                for i, label, p in zip(ids_arr[test], y[test], prob, strict=True)
            ]
    return pd.DataFrame(rows, columns=["repeat", "id", "label", "probability", "predicted"])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    quiet()
    ids, y, pooled = patient_table(str(args.data), args.cache_dir)
    clinical = logistic(pooled["clinical"], y, 1.0)
    for protocol in ("all_train", "inner_val"):
        reference = out_of_fold([clinical], ids, y, protocol)
        models = {"clinical": reference}
        for pooling in ("mean", "mean_std"):
            for c in GRID:
                image = logistic(pooled[pooling], y, c)
                models[f"{pooling}_C{c}+clinical"] = out_of_fold(
                    [image, clinical], ids, y, protocol
                )
        for name, oof in models.items():
            summary, difference = metric_summary(oof), paired_difference(reference, oof)
            emit(
                "dlmi_linear_experts",
                protocol=protocol,
                model=name,
                **{m: interval(summary[m]) for m in METRICS},
                **{f"{m}_minus_clinical": interval(difference[m]) for m in METRICS},
            )


if __name__ == "__main__":
    main()
