"""A study: does averaging fold models help on the real data? (the ``cv --predict`` ensemble)

    OMP_NUM_THREADS=1 python benchmarks/dlmi_ensemble.py [--data DLMI_FOLDER] [--inner-folds 5]

``lympho-mil cv --predict`` answers new patients with the mean probability of its fold models
and the median of their thresholds (:mod:`lympho_mil.evaluation.ensemble`). Here that
ensemble is scored without bias, nested in the outer splits of ``benchmarks/dlmi_recipe.py``
(5 folds x 3 repeats): in every outer split, the config is cross-validated on the outer
training patients alone (``--inner-folds`` folds, one repeat, inner validation as outside)
and its fold models' ensemble predicts the outer test patients. The single models of the
outer CV (one model trained on the same patients, checkpoint and threshold chosen on 13 of
them) are the reference. JSON lines per model (``TabularMLP`` and the recipe): balanced
accuracy and AUROC of the single model and of the ensemble, the paired difference, and the
ensemble recipe's paired difference to the ensemble ``TabularMLP`` (docs/results.md).
"""

from __future__ import annotations

import json
import time

import pandas as pd
import torch
from dlmi_recipe import METRICS, interval, load
from speed_common import emit, parser, quiet

from lympho_mil import compare_configs, cross_validate
from lympho_mil.evaluation.bootstrap import metric_summary, paired_difference
from lympho_mil.evaluation.cv import OOF_COLUMNS, CVResult


def nested_ensemble(
    config: dict, outer: CVResult, overrides: list[str], inner_folds: int
) -> pd.DataFrame:
    """Out-of-fold predictions of the fold-model ensemble, in the outer splits of ``outer``."""
    rows = []
    for run in outer.runs:
        split = run.split
        inner = cross_validate(
            config,
            folds=inner_folds,
            seed=0,
            overrides=[*overrides, f"--data.predict_ids={json.dumps(split.test_ids)}"],
            predict=True,
            n_bootstrap=1,
            verbose=False,
            patients=sorted(split.train_ids + split.val_ids),
        )
        assert inner.ensemble is not None
        for record in inner.ensemble:
            rows.append(
                {
                    "repeat": split.repeat,
                    "fold": split.fold,
                    "id": record["id"],
                    "label": record["label"],
                    "probability": record["probability"],
                    "predicted": int(record["probability"] >= record["threshold"]),
                    "threshold": record["threshold"],
                }
            )
    return pd.DataFrame(rows, columns=list(OOF_COLUMNS))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner-folds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    configs = {"tabular_mlp": load("tabular_mlp.yaml"), "recipe": load("dlmi.yaml")}
    overrides = [f"--data.root={args.data}"]
    if args.cache_dir is not None:
        overrides.append(f"--data.cache_dir={args.cache_dir}")
    outer = compare_configs(configs, repeats=args.repeats, overrides=overrides, verbose=False)
    ensembles = {}
    for result in outer.results:
        start = time.perf_counter()
        ensemble = nested_ensemble(configs[result.name], result, overrides, args.inner_folds)
        ensembles[result.name] = ensemble
        single, averaged = metric_summary(result.oof), metric_summary(ensemble)
        difference = paired_difference(result.oof, ensemble)
        emit(
            "dlmi_ensemble",
            model=result.name,
            inner_folds=args.inner_folds,
            **{f"single_{m}": interval(single[m]) for m in METRICS},
            **{f"ensemble_{m}": interval(averaged[m]) for m in METRICS},
            **{f"ensemble_minus_single_{m}": interval(difference[m]) for m in METRICS},
            seconds=round(time.perf_counter() - start, 1),
        )
    difference = paired_difference(ensembles["tabular_mlp"], ensembles["recipe"])
    emit(
        "dlmi_ensemble",
        model="recipe_minus_tabular_mlp",
        **{f"ensemble_{m}": interval(difference[m]) for m in METRICS},
    )


if __name__ == "__main__":
    main()
