"""The DLMI recipe against its baselines: repeated 5-fold CV on identical patient splits.

    OMP_NUM_THREADS=1 python benchmarks/dlmi_recipe.py [--data DLMI_FOLDER] [--repeats 3]
        [--out runs/dlmi_recipe] [--cache-dir DIR] [--variants] [--nested]

Models: ``TabularMLP`` (examples/configs/tabular_mlp.yaml, the reference of the paired
differences), the image-only ``AttentionMIL`` on the recipe's features (dlmi_attention.yaml)
and the recipe (dlmi.yaml). ``--variants`` adds every other model tried while the recipe was
designed, so that docs/results.md can list them all (the pixel-level CNN among them, without
and with 8 test-time views, takes about 40 minutes of it). ``--nested`` adds the recipe's
candidate heads (fixed in advance, :func:`candidates`) and estimates, without bias, the
procedure that picks one of them by an inner cross-validation of the training patients: in
every outer fold, each candidate is cross-validated on that fold's training patients alone
(``--inner-folds``), the best inner balanced accuracy (then AUROC) wins, and the winner's
prediction of the outer test fold is kept. JSON lines: the one-off decoding of the crops and
extraction of the morphology features (timed apart; a warm cache loads in well under a second),
then per model its balanced accuracy and AUROC (mean over repeats, 95 % patient-bootstrap CI),
its paired difference to TabularMLP and the wall time of its whole CV. ``--out`` also receives
every model's ``cv_report.md`` and ``comparison.md``.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from speed_common import emit, parser, quiet

from lympho_mil import compare_configs, cross_validate
from lympho_mil.data import CachedFeatureDataModule, PatientBagDataModule
from lympho_mil.evaluation.bootstrap import metric_summary, paired_difference
from lympho_mil.evaluation.cv import CVResult

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
METRICS = ("balanced_accuracy", "auroc")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def changed(config: dict[str, Any], class_path: str | None = None, **init_args: Any) -> dict:
    """A copy of ``config`` with other model settings (None removes a setting)."""
    config = copy.deepcopy(config)
    model = config["model"]
    model["class_path"] = class_path or model["class_path"]
    model["init_args"].update(init_args)
    for key in [k for k, v in model["init_args"].items() if v is None]:
        del model["init_args"][key]
    return config


def candidates(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The recipe's candidate heads, fixed before any of them was cross-validated: mean or
    distribution pooling (mean and share of crops beyond -1 and +1 training SD of each
    feature), each with the concatenation MLP or with late fusion (a linear image expert and a
    clinical expert, each also trained on the label alone, mixed by the confidence gate)."""
    late = {"fusion": "gated", "gate_input": "confidence", "expert_loss_weight": 1.0}
    concat = {"fusion": "concat", "gate_input": None, "expert_loss_weight": None}
    return {
        "mean_concat": changed(recipe, pooling="mean", **concat),
        "distribution_concat": changed(recipe, pooling="distribution", **concat),
        "mean_experts": changed(recipe, pooling="mean", **late),
        "distribution_experts": changed(recipe, pooling="distribution", **late),
    }


def variants(first: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The heads tried around the first recipe (``first``: mean pooling, concatenation MLP)
    on its features (same data, epochs and checkpointing), and the pixel-level fusion model
    of gated_fusion_mil.yaml."""

    mlp = {"encoder": "mlp", "embed_dim": 32, "encoder_kwargs": {"hidden": 64, "dropout": 0.1}}
    attention = {"pooling": "attention", "attention_hidden": 32, "fusion": "gated"}
    return {
        "attention_mlp": changed(
            first, "AttentionMIL", **mlp, attention_hidden=32, pooling=None, fusion=None
        ),
        "fusion_mlp_gated_attention": changed(first, **mlp, **attention),
        "fusion_mlp_concat_mean": changed(first, **mlp),
        "fusion_linear_gated_attention": changed(first, **attention),
        "pixels_gated_fusion_small_cnn": load("gated_fusion_mil.yaml"),  # CNN from scratch
        # the same, evaluated (checkpoint, threshold, test) on the 8 dihedral views of each crop
        "pixels_gated_fusion_small_cnn_tta8": changed(load("gated_fusion_mil.yaml"), tta_views=8),
    }


def time_caches(recipe: dict[str, Any], root: Path, cache_dir: str | None) -> None:
    """Decode the crops and extract the recipe's features once, timing each step."""
    args = {**recipe["data"]["init_args"], "root": str(root), "cache_dir": cache_dir}
    dm = CachedFeatureDataModule(**args)
    bags = list(dm.bags.values())
    start = time.perf_counter()
    images, _ = PatientBagDataModule.build_store(dm, bags)
    emit("image_cache", crops=len(images), seconds=round(time.perf_counter() - start, 2))
    start = time.perf_counter()
    features, _ = dm.build_store(bags)
    emit(
        "feature_extraction",
        encoder=dm.encoder_name,
        crops=len(features),
        dim=dm.feature_dim,
        seconds=round(time.perf_counter() - start, 2),
    )


def nested_selection(
    configs: dict[str, dict[str, Any]],
    results: dict[str, CVResult],
    overrides: list[str],
    inner_folds: int,
    seed: int,
) -> tuple[pd.DataFrame, list[str]]:
    """Out-of-fold predictions of "pick the candidate with the best inner CV", and the picks.

    For every outer split of the candidates' CV (``results`` of ``configs``), each
    candidate is cross-validated on the outer training patients only (its inner validation
    included; ``inner_folds`` folds, one repeat, 20 % inner validation as outside); the
    outer test predictions of the winner (best inner balanced accuracy, then AUROC) are kept.
    """
    names = list(results)
    first = results[names[0]]
    rows, picks = [], []
    for outer in (run.split for run in first.runs):
        pool = sorted(outer.train_ids + outer.val_ids)
        scores = {}
        for name in names:
            inner = cross_validate(
                configs[name],
                folds=inner_folds,
                seed=seed,
                overrides=overrides,
                n_bootstrap=1,
                verbose=False,
                patients=pool,
            ).oof
            scores[name] = (
                balanced_accuracy_score(inner["label"], inner["predicted"]),
                roc_auc_score(inner["label"], inner["probability"]),
            )
        pick = max(names, key=lambda n: scores[n])
        picks.append(pick)
        oof = results[pick].oof
        rows.append(oof[(oof["repeat"] == outer.repeat) & (oof["fold"] == outer.fold)])
        emit("nested_fold", repeat=outer.repeat, fold=outer.fold, pick=pick, inner=scores)
    return pd.concat(rows, ignore_index=True), picks


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("runs/dlmi_recipe"))
    p.add_argument("--variants", action="store_true", help="also every other head tried")
    p.add_argument("--nested", action="store_true", help="candidates and nested selection")
    p.add_argument("--inner-folds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--workers", type=int, help="loader workers (default: each config's)")
    args = p.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    recipe = load("dlmi.yaml")
    time_caches(recipe, args.data, args.cache_dir)
    configs = {
        "tabular_mlp": load("tabular_mlp.yaml"),
        "attention_image_only": load("dlmi_attention.yaml"),
        "recipe": recipe,
    }
    if args.variants:
        configs.update(variants(candidates(recipe)["mean_concat"]))
    pool = candidates(recipe) if args.nested else {}
    configs.update({n: c for n, c in pool.items() if c not in configs.values()})
    overrides = [f"--data.root={args.data}"]
    if args.cache_dir is not None:
        overrides.append(f"--data.cache_dir={args.cache_dir}")
    if args.workers is not None:
        overrides.append(f"--data.num_workers={args.workers}")
    comparison = compare_configs(
        configs,
        folds=args.folds,
        repeats=args.repeats,
        out_dir=args.out,
        overrides=overrides,
        overwrite=True,
        verbose=False,
    )
    table = comparison.table
    for result in comparison.results:
        report = result.report
        difference = table["difference"].get(result.name, {})
        emit(
            "dlmi_cv",
            model=result.name,
            folds=args.folds,
            repeats=args.repeats,
            **{m: interval(report[m]) for m in METRICS},
            **{f"{m}_minus_tabular_mlp": interval(difference[m]) for m in METRICS if difference},
            cv_seconds=report["wall_time_s"],
        )
    if pool:
        by_name = {r.name: r for r in comparison.results}
        same = {n: next(k for k, c in configs.items() if c == pool[n]) for n in pool}
        results = {n: by_name[same[n]] for n in pool}  # a candidate may be the recipe itself
        start = time.perf_counter()
        oof, picks = nested_selection(pool, results, overrides, args.inner_folds, seed=0)
        summary = metric_summary(oof)
        difference = paired_difference(comparison.results[0].oof, oof)
        emit(
            "dlmi_cv",
            model="nested_selection",
            folds=args.folds,
            repeats=args.repeats,
            picks=dict(Counter(picks)),
            **{m: interval(summary[m]) for m in METRICS},
            **{f"{m}_minus_tabular_mlp": interval(difference[m]) for m in METRICS},
            selection_seconds=round(time.perf_counter() - start, 1),
        )


def interval(stats: dict[str, float]) -> list[float]:
    """[mean, CI low, CI high], rounded."""
    return [round(stats[k], 3) for k in ("mean", "ci95_low", "ci95_high")]


if __name__ == "__main__":
    main()
