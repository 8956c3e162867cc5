"""The DLMI recipe against its baselines: repeated 5-fold CV on identical patient splits.

    OMP_NUM_THREADS=1 python benchmarks/dlmi_recipe.py [--data DLMI_FOLDER] [--repeats 3]
        [--out runs/dlmi_recipe] [--cache-dir DIR] [--variants]

Models: ``TabularMLP`` (examples/configs/tabular_mlp.yaml, the reference of the paired
differences), the image-only ``AttentionMIL`` on the recipe's features (dlmi_attention.yaml)
and the recipe (dlmi.yaml). ``--variants`` adds every other model tried while the recipe was
designed, so that docs/results.md can list them all (the pixel-level CNN among them takes
about 15 of the 30 minutes). JSON lines: the one-off decoding of the crops and extraction of
the morphology features (timed apart; a warm cache loads in well under a second), then per
model its balanced accuracy and AUROC (mean over repeats, 95 % patient-bootstrap CI), its
paired difference to TabularMLP and the wall time of its whole CV. ``--out`` also receives
every model's ``cv_report.md`` and ``comparison.md``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from speed_common import emit, parser, quiet

from lympho_mil.data import CachedFeatureDataModule, PatientBagDataModule
from lympho_mil.evaluation.cv import compare_configs

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
METRICS = ("balanced_accuracy", "auroc")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def variants(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The other heads tried on the recipe's features (same data, epochs and checkpointing),
    and the pixel-level fusion model of gated_fusion_mil.yaml."""

    def changed(class_path: str | None = None, **init_args: Any) -> dict[str, Any]:
        config = copy.deepcopy(recipe)
        model = config["model"]
        model["class_path"] = class_path or model["class_path"]
        model["init_args"].update(init_args)
        for key in [k for k, v in model["init_args"].items() if v is None]:
            del model["init_args"][key]
        return config

    mlp = {"encoder": "mlp", "embed_dim": 32, "encoder_kwargs": {"hidden": 64, "dropout": 0.1}}
    attention = {"pooling": "attention", "attention_hidden": 32, "fusion": "gated"}
    return {
        "attention_mlp": changed(
            "AttentionMIL", **mlp, attention_hidden=32, pooling=None, fusion=None
        ),
        "fusion_mlp_gated_attention": changed(**mlp, **attention),
        "fusion_mlp_concat_mean": changed(**mlp),
        "fusion_linear_gated_attention": changed(**attention),
        "pixels_gated_fusion_small_cnn": load("gated_fusion_mil.yaml"),  # CNN from scratch
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


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("runs/dlmi_recipe"))
    p.add_argument("--variants", action="store_true", help="also every other head tried")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
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
        configs.update(variants(recipe))
    overrides = [f"--data.root={args.data}"]
    if args.cache_dir is not None:
        overrides.append(f"--data.cache_dir={args.cache_dir}")
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
            **{m: _interval(report[m]) for m in METRICS},
            **{f"{m}_minus_tabular_mlp": _interval(difference[m]) for m in METRICS if difference},
            cv_seconds=report["wall_time_s"],
        )


def _interval(stats: dict[str, float]) -> list[float]:
    """[mean, CI low, CI high], rounded."""
    return [round(stats[k], 3) for k in ("mean", "ci95_low", "ci95_high")]


if __name__ == "__main__":
    main()
