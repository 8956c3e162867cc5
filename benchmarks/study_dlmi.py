"""DLMI rounds: candidates cross-validated on identical repeated splits of dlmi-dev.

``dlmi-round7`` (docs/results.md, seventh round, its rule fixed before it ran): three crop
representations (the recipe's 33 morphology features, 54 scikit-image cytometry features,
128 features of a crop encoder pretrained with SimCLR on the crops themselves) times three
patient summaries (mean, per-feature statistics, shares of 16 cell types), each as an
image-only linear model and in the recipe's late fusion, beside ``TabularMLP``.

Each candidate's cross-validation goes to ``--out/<candidate>/`` (the files of ``lympho-mil
cv``); a candidate whose report there was made from the same config is not run again, so a
study can be run in pieces (``--candidates``) and resumed. Records: one per candidate
(balanced accuracy and AUROC with 95 % patient-bootstrap intervals, paired differences to
``TabularMLP`` and to the current recipe, whole-CV time), once all references are there.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from harness import DEFAULT_UNLABELLED, Record, read_records, study

from lympho_mil.cli import cross_validate
from lympho_mil.data import CropSettings, PatientBagDataModule
from lympho_mil.data.image_cache import default_cache_dir
from lympho_mil.evaluation.bootstrap import metric_summary, paired_difference
from lympho_mil.evaluation.thresholds import choose_threshold
from lympho_mil.features.cytometry import CYTOMETRY_FEATURES
from lympho_mil.features.pretrain import PretrainSettings, folder_crops, pretrained_encoder
from lympho_mil.nn import MORPHOLOGY_FEATURES, SmallCNN

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
METRICS = ("balanced_accuracy", "auroc")
REFERENCE, RECIPE = "tabular_mlp", "fused_morphology_mean"
SSL_SETTINGS = PretrainSettings(stain_jitter=0.0)  # the seventh round's: 100 epochs, SmallCNN w32
SSL200_SETTINGS = replace(SSL_SETTINGS, epochs=200)  # the tenth round's: twice as long
SSL96_SETTINGS, SSL96_SIZE = replace(SSL_SETTINGS, epochs=50), 96  # the fourteenth's: 96 px
DINO_SETTINGS = replace(SSL_SETTINGS, method="dino", epochs=50, temperature=0.1)  # the fifteenth's
SEED1_SETTINGS = replace(SSL_SETTINGS, seed=1)  # the nineteenth round's: another seed
PATIENT_PAIRS_SETTINGS = replace(SSL_SETTINGS, patient_pairs=0.5)  # the twenty-fourth round's
CELL_TYPES = 16


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def with_data(config: dict[str, Any], root: Path, cache_dir: str | None) -> dict[str, Any]:
    """A copy of ``config`` reading ``root`` (and ``cache_dir``)."""
    config = copy.deepcopy(config)
    config["data"]["init_args"]["root"] = str(root)
    if cache_dir is not None:
        crops = config["data"]["init_args"].setdefault("crops", {})
        crops["cache_dir"] = cache_dir
    return config


def ssl_weights(
    roots: list[Path],
    cache_dir: str | None,
    settings: PretrainSettings = SSL_SETTINGS,
    image_size: int = 64,
    center_crop: int = 112,
) -> tuple[Path, float]:
    """An encoder pretrained (the seventh round's SimCLR ``settings`` by default) on every crop of
    ``roots`` (``image_size`` px of the ``center_crop`` px centre; cached), and the seconds
    this call took."""
    start = time.perf_counter()
    crops = CropSettings(image_size=image_size, center_crop=center_crop, cache_dir=cache_dir)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    arrays, patients = folder_crops(roots, crops)
    path = pretrained_encoder(arrays, settings, crops.mean, crops.std, folder, patients=patients)
    return path, time.perf_counter() - start


def pretraining_record(weights: Path, seconds: float) -> Record:
    """What a pretraining took (from its cached sidecar) and what this call took."""
    meta = json.loads(weights.with_suffix(".json").read_text())
    return {
        "record": "pretraining",
        "weights": weights.name,
        "call_s": round(seconds, 1),
        **{k: meta[k] for k in ("crops", "seconds", "settings")},
        "loss_first_last": [meta["loss"][0], meta["loss"][-1]],
    }


def round7_candidates(
    ssl_path: Path | None,
    ssl_settings: PretrainSettings = SSL_SETTINGS,
    ssl_size: int = 64,
    ssl_centre: int = 112,
) -> dict[str, dict[str, Any]]:
    """The seventh round's candidates (configs without a data root), references first;
    ``ssl_path``: the weights of a `SmallCNN` pretrained with ``ssl_settings`` on crops of
    ``ssl_size`` px of the ``ssl_centre`` px centre."""
    recipe = load("dlmi.yaml")
    representations: dict[str, tuple[dict[str, dict[str, Any]], int]] = {
        "morphology": ({"features": {"encoder": "morphology"}}, len(MORPHOLOGY_FEATURES)),
        "cytometry": ({"features": {"encoder": "cytometry"}}, len(CYTOMETRY_FEATURES)),
    }
    if ssl_path is not None:
        ssl = {
            "features": {
                "encoder": "small_cnn",
                "weights": str(ssl_path),
                "kwargs": ssl_settings.encoder_kwargs,
            },
            "crops": {"image_size": ssl_size, "center_crop": ssl_centre},
        }
        representations["ssl"] = (ssl, ssl_settings.out_dim)
    summaries = {"mean": ("mean", 0), "statistics": ("statistics", 0), "types": ("mean", 16)}
    candidates = {REFERENCE: load("tabular_mlp.yaml")}
    for rep, (data_args, dim) in representations.items():
        for summary, (pooling, types) in summaries.items():
            fused = copy.deepcopy(recipe)
            data = fused["data"]["init_args"]
            for group, settings in data_args.items():
                data[group] = {**data.get(group, {}), **settings}
            data["cell_types"] = types
            fused["model"]["init_args"]["pooling"] = {"name": pooling}
            fused["model"]["init_args"]["encoder"]["in_dim"] = types or dim
            image = copy.deepcopy(fused)
            head = {
                k: v
                for k, v in image["model"]["init_args"].items()
                if k in ("encoder", "optim", "pos_weight")
            }
            pool_class = "StatisticsPoolMIL" if pooling == "statistics" else "MeanPoolMIL"
            image["model"] = {"class_path": pool_class, "init_args": head}
            candidates[f"fused_{rep}_{summary}"] = fused
            candidates[f"images_{rep}_{summary}"] = image
    order = [REFERENCE, RECIPE] + [n for n in candidates if n not in (REFERENCE, RECIPE)]
    return {n: candidates[n] for n in order}


def oof_of(folder: Path) -> pd.DataFrame:
    """The out-of-fold predictions in the cv output ``folder``."""
    return pd.read_csv(folder / "oof_predictions.csv", dtype={"id": str})


def _cv(
    name: str,
    config: dict[str, Any],
    args: argparse.Namespace,
    earlier: Path | None = None,
    inner_folds: int | None = None,
) -> tuple[pd.DataFrame, Path]:
    """The out-of-fold predictions of ``config`` (with ``inner_folds``: a bag of models a
    fold) and the folder of its cv outputs: an earlier run's (in ``args.out/name``, or
    ``earlier/name``), if made from the same config, else a new cross-validation into
    ``args.out/name``."""
    for folder in (args.out, earlier):
        if folder is not None and same_run(folder / name, config, args.repeats, inner_folds):
            return oof_of(folder / name), folder / name
    out = args.out / name
    result = cross_validate(
        config,
        folds=args.folds,
        repeats=args.repeats,
        seed=0,
        out_dir=out,
        overwrite=True,
        inner_folds=inner_folds,
    )
    return result.oof, out


def same_run(
    out: Path, config: dict[str, Any], repeats: int, inner_folds: int | None = None
) -> bool:
    """Whether ``out`` holds the cv outputs of ``config`` with ``repeats`` repeats and
    ``inner_folds`` (reports from before inner folds existed: None)."""
    if not (out / "cv_report.json").is_file():
        return False
    report = json.loads((out / "cv_report.json").read_text())
    return (
        report.get("config", {}).get("content") == config
        and report.get("repeats") == repeats
        and report.get("inner_folds") == inner_folds
    )


def _row(name: str, oof: pd.DataFrame, refs: dict[str, pd.DataFrame], out: Path) -> Record:
    """The record of candidate ``name`` (cv outputs in ``out``): its metrics and paired
    differences to ``refs``."""
    report = json.loads((out / "cv_report.json").read_text())
    summary = metric_summary(oof, 2000, 0)
    row: Record = {
        "record": "candidate",
        "candidate": name,
        **{m: summary[m] for m in METRICS},
        "whole_cv_s": report["wall_time_s"],
        "folds": report["folds"],
        "repeats": report["repeats"],
        "patients": report["n_patients"],
    }
    for ref_name, ref in refs.items():
        if ref_name != name:
            diff = paired_difference(ref, oof, 2000, 0)
            row[f"minus_{ref_name}"] = {m: diff[m] for m in METRICS}
    return row


def round7_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidates", nargs="*", default=None, help="run only these candidates")
    p.add_argument("--no-ssl", action="store_true", help="leave out the pretrained encoder")
    round10_arguments(p)


def round10_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--unlabelled", type=Path, default=DEFAULT_UNLABELLED, help="more crops to pretrain on"
    )
    p.add_argument(
        "--out-seventh",
        type=Path,
        default=Path("runs/benchmarks/dlmi-round7"),
        help="the seventh round's working folder (its references are reused; its verdict is "
        "read from benchmarks/results/dlmi-round7.jsonl)",
    )


@study("dlmi-round7", "the seventh round: crop representations x summaries", round7_arguments)
def round7(args: argparse.Namespace) -> Iterator[Record]:
    args.out = args.out or Path("runs/benchmarks/dlmi-round7")
    ssl_path = None
    if not args.no_ssl:
        ssl_path, seconds = ssl_weights([args.data, args.unlabelled], args.cache_dir)
        yield pretraining_record(ssl_path, seconds)
    candidates = {
        n: with_data(c, args.data, args.cache_dir) for n, c in round7_candidates(ssl_path).items()
    }
    wanted = args.candidates or list(candidates)
    unknown = sorted(set(wanted) - set(candidates))
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {sorted(candidates)}")
    rows = _rows(candidates, wanted, args)
    yield from rows
    if len(rows) == len(candidates):
        yield round7_verdict(rows)


def _rows(
    candidates: dict[str, dict[str, Any]],
    wanted: list[str],
    args: argparse.Namespace,
    earlier: Path | None = None,
) -> list[Record]:
    """Cross-validate the ``wanted`` candidates and the references (or find their earlier
    runs), and make their records."""
    runs = {
        name: _cv(name, config, args, earlier)
        for name, config in candidates.items()
        if name in wanted or name in (REFERENCE, RECIPE)
    }
    refs = {n: runs[n][0] for n in (REFERENCE, RECIPE)}
    return [_row(name, oof, refs, out) for name, (oof, out) in runs.items()]


L2_OPTIMIZER = {
    "optimizer": {
        "class_path": "torch.optim.Adam",
        "init_args": {"lr": 0.003, "weight_decay": 0.2},
    },
    "lr_scheduler": {
        "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
        "init_args": {"T_max": 60},
    },
}
"""The eighth round's optimiser: Adam with an L2 penalty (coupled weight decay) of 0.2 on every
parameter, about a ridge logistic regression with C = 1 / (0.2 x 52) = 0.1 on 52 training
patients; the same learning rate and cosine over the recipe's 60 epochs."""


def round8_candidates(ssl_path: Path | None) -> dict[str, dict[str, Any]]:
    """The eighth round's candidates: the seventh round's mean and statistics summaries, image
    only and fused, trained with `L2_OPTIMIZER`; the references unchanged."""
    seventh = round7_candidates(ssl_path)
    candidates = {n: seventh[n] for n in (REFERENCE, RECIPE)}
    for name, config in seventh.items():
        if name.endswith(("_mean", "_statistics")):
            candidates[f"{name}_l2"] = {**copy.deepcopy(config), **copy.deepcopy(L2_OPTIMIZER)}
    return candidates


@study("dlmi-round8", "the eighth round: the seventh's heads with an L2 penalty", round7_arguments)
def round8(args: argparse.Namespace) -> Iterator[Record]:
    seventh_out = args.out_seventh
    args.out = args.out or Path("runs/benchmarks/dlmi-round8")
    ssl_path = None if args.no_ssl else ssl_weights([args.data, args.unlabelled], args.cache_dir)[0]
    candidates = {
        n: with_data(c, args.data, args.cache_dir) for n, c in round8_candidates(ssl_path).items()
    }
    wanted = args.candidates or list(candidates)
    rows = _rows(candidates, wanted, args, earlier=seventh_out)
    yield from rows
    if len(rows) == len(candidates):
        seventh = [r for r in read_records("dlmi-round7") if r.get("record") == "candidate"]
        yield round8_verdict(seventh, rows)


def round8_verdict(seventh: list[Record], eighth: list[Record]) -> Record:
    """The eighth round's rule (docs/results.md): its image pathway is its image-only candidate
    of highest AUROC (ties as in the seventh); it replaces the seventh round's image pathway
    if its AUROC is higher; the fused twin of the pathway that stands becomes the recipe if it
    beats the current recipe in balanced accuracy and AUROC; the bars, met or not."""
    before = round7_verdict(seventh)
    by_name = {r["candidate"]: r for r in [*seventh, *eighth]}
    own = round7_verdict(eighth)
    pathway = own["image_pathway"]
    if not above(
        by_name[pathway]["auroc"]["mean"], by_name[before["image_pathway"]]["auroc"]["mean"]
    ):
        return {**before, "record": "verdict", "round": 8, "eighth_pathway_lost": pathway}
    return {**own, "record": "verdict", "round": 8, "replaces": before["image_pathway"]}


def above(value: float, bar: float) -> bool:
    """``value`` above ``bar`` beyond float rounding: the means of the rounds are sums of the
    same fractions in other orders, equal ones differ in their last bits (the sixteenth
    round's logit sum and recipe: AUROC 0.9091428571428573 and 0.909142857142857, both 1,591
    of 1,750 exactly)."""
    return round(value - bar, 9) > 0


def beats(record: Record, other: Record) -> bool:
    """``record`` above ``other`` in every metric (`above`)."""
    return all(above(record[m]["mean"], other[m]["mean"]) for m in METRICS)


def image_pathway(rows: list[Record]) -> Record:
    """The image-only candidate (``images_*``) of highest AUROC; within 0.005 of it, the
    higher balanced accuracy."""
    images = [r for r in rows if r["candidate"].startswith("images_")]
    top_auroc = max(r["auroc"]["mean"] for r in images)
    close = [r for r in images if r["auroc"]["mean"] >= top_auroc - 0.005]
    return max(close, key=lambda r: (r["balanced_accuracy"]["mean"], r["auroc"]["mean"]))


def round7_verdict(rows: list[Record]) -> Record:
    """The seventh round's rule (docs/results.md), applied to its candidate records: the image
    pathway is the image-only candidate of highest AUROC (within 0.005, higher balanced
    accuracy); its fused twin replaces the recipe if it beats it in both metrics; the bars of
    issue 19, met or not."""
    by_name = {r["candidate"]: r for r in rows}
    pathway = image_pathway(rows)
    fused = by_name["fused_" + pathway["candidate"].removeprefix("images_")]
    recipe = by_name[RECIPE]
    adopted = fused["candidate"] != RECIPE and beats(fused, recipe)
    return {
        "record": "verdict",
        "image_pathway": pathway["candidate"],
        "fused": fused["candidate"],
        "adopted_as_recipe": adopted,
        **bars(pathway, fused),
    }


def bars(pathway: Record | None, fused: Record) -> Record:
    """The bars of issue 19, met or not, for an image pathway and a fused candidate."""
    versus = fused[f"minus_{REFERENCE}"]
    images = {}
    if pathway is not None:
        images = {
            "bar_images_balanced_accuracy_0.80": not above(
                0.80, pathway["balanced_accuracy"]["mean"]
            ),
            "bar_images_auroc_0.85": not above(0.85, pathway["auroc"]["mean"]),
        }
    return {
        **images,
        "bar_fused_plus_0.05_ci_above_0": not above(0.05, versus["balanced_accuracy"]["mean"])
        and above(versus["balanced_accuracy"]["ci95_low"], 0),
        "bar_fused_auroc_difference_above_0": above(versus["auroc"]["mean"], 0),
    }


def threshold_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/benchmarks/dlmi-round7"),
        help="a DLMI round's working folder (one cv output per candidate)",
    )
    p.add_argument(
        "--candidates", nargs="*", default=[REFERENCE, RECIPE], help="candidates to compare"
    )


@study(
    "threshold-rules",
    "fixed 0.5 against the inner-validation threshold, on a round's out-of-fold predictions",
    threshold_arguments,
)
def threshold_rules(args: argparse.Namespace) -> Iterator[Record]:
    """The two threshold rules of ``fit`` (issue 27, item 7), measured without training again:
    the threshold does not change the training or the checkpoint, so a round's out-of-fold
    probabilities give both rules' decisions on identical models and splits."""
    for name in args.candidates:
        chosen = oof_of(args.runs / name)
        fixed = chosen.assign(threshold=0.5, predicted=(chosen["probability"] >= 0.5).astype(int))
        summaries = {
            "inner_val": metric_summary(chosen, 2000, 0),
            "fixed_0.5": metric_summary(fixed, 2000, 0),
        }
        diff = paired_difference(chosen, fixed, 2000, 0)
        yield {
            "record": "threshold_rule",
            "candidate": name,
            **{
                f"{rule}_balanced_accuracy": s["balanced_accuracy"] for rule, s in summaries.items()
            },
            "fixed_minus_inner_val": diff["balanced_accuracy"],
            "median_inner_threshold": round(float(chosen["threshold"].median()), 3),
        }


def _logit(p: pd.Series) -> np.ndarray:
    q = np.clip(p.to_numpy(dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(q / (1 - q))


def logit_sum(*folders: Path, weights: Sequence[float] | None = None) -> pd.DataFrame:
    """Out-of-fold predictions of the product of experts cross-validated on identical splits
    (``folders``: their cv output folders): per fold, the probability of the (``weights``-)
    weighted sum of their logits, the threshold chosen by cv's rule on the weighted sum of
    the inner-validation logits of that fold."""
    weights = [1.0] * len(folders) if weights is None else list(weights)
    if len(weights) != len(folders) or len(folders) < 2:
        raise ValueError(f"{len(folders)} folders and {len(weights)} weights: need two or more")
    keys = ["repeat", "fold", "id", "label"]
    frames = {}
    for kind in ("oof_predictions", "inner_val_predictions"):
        tables = [pd.read_csv(f / f"{kind}.csv", dtype={"id": str}) for f in folders]
        total = tables[0][keys].assign(logit=0.0)
        for folder, table, weight in zip(folders, tables, weights, strict=True):
            both = total.merge(table[[*keys, "probability"]], on=keys)
            if len(both) != len(total) or len(both) != len(table):
                raise ValueError(f"{folders[0]} and {folder} do not hold the same {kind}")
            total = both[keys].assign(logit=both["logit"] + weight * _logit(both["probability"]))
        frames[kind] = total[keys].assign(probability=1 / (1 + np.exp(-total["logit"])))
    inner, oof = frames["inner_val_predictions"], frames["oof_predictions"]
    thresholds = {
        fold: choose_threshold("inner_val", group["probability"], group["label"])
        for fold, group in inner.groupby(["repeat", "fold"])
    }
    oof["threshold"] = [thresholds[(r, f)] for r, f in zip(oof["repeat"], oof["fold"], strict=True)]
    oof["predicted"] = (oof["probability"] >= oof["threshold"]).astype(int)
    return oof


@study("dlmi-round9", "the ninth round: logit sum of the clinical model and the image pathway")
def round9(args: argparse.Namespace) -> Iterator[Record]:
    seventh = args.out or Path("runs/benchmarks/dlmi-round7")
    refs = {n: oof_of(seventh / n) for n in (REFERENCE, RECIPE)}
    row = sum_row("sum_ssl_types", [seventh / REFERENCE, seventh / "images_ssl_types"], refs)
    yield row
    recipe = metric_summary(refs[RECIPE], 2000, 0)
    yield {
        "record": "verdict",
        "round": 9,
        "adopted_as_recipe": beats(row, recipe),
        **bars(None, row),
    }


def sum_row(
    name: str,
    folders: Sequence[Path],
    refs: dict[str, pd.DataFrame],
    weights: Sequence[float] | None = None,
) -> Record:
    """The record of the product of experts whose cv outputs are ``folders`` (`logit_sum`,
    ``weights``): metrics and paired differences to ``refs``; no training."""
    oof = logit_sum(*folders, weights=weights)
    summary = metric_summary(oof, 2000, 0)
    row: Record = {"record": "candidate", "candidate": name}
    row.update({m: summary[m] for m in METRICS})
    for ref_name, ref in refs.items():
        diff = paired_difference(ref, oof, 2000, 0)
        row[f"minus_{ref_name}"] = {m: diff[m] for m in METRICS}
    return row


def ssl_round(
    round_no: int,
    args: argparse.Namespace,
    candidates_of: Callable[[Path], dict[str, dict[str, Any]]],
    images: Sequence[str],
    settings: PretrainSettings = SSL_SETTINGS,
    size: int = 64,
    fused_twin: bool = True,
) -> Iterator[Record]:
    """A round of the tenth round's kind: the encoder pretrained with ``settings`` on
    ``size`` px crops (cached) and its record; then `challenge` of the ``images`` candidates
    among ``candidates_of(weights)``."""
    args.out = args.out or Path(f"runs/benchmarks/dlmi-round{round_no}")
    ssl_path, seconds = ssl_weights([args.data, args.unlabelled], args.cache_dir, settings, size)
    yield pretraining_record(ssl_path, seconds)
    yield from challenge(round_no, candidates_of(ssl_path), list(images), args, fused_twin)


def image_heads(tag: str) -> list[str]:
    """The seventh round's three image-only SSL heads, named for the encoder ``tag``."""
    return [f"images_{tag}_{summary}" for summary in ("mean", "statistics", "types")]


def with_encoder_tag(configs: dict[str, dict[str, Any]], tag: str) -> dict[str, dict[str, Any]]:
    """The references of ``configs`` (the seventh round's candidates) and their SSL candidates
    renamed for another encoder (``images_ssl_mean`` -> ``images_<tag>_mean``)."""
    candidates = {n: configs[n] for n in (REFERENCE, RECIPE)}
    return candidates | {
        n.replace("_ssl_", f"_{tag}_"): c for n, c in configs.items() if "_ssl_" in n
    }


def round10_candidates(ssl_path: Path) -> dict[str, dict[str, Any]]:
    """The tenth round's candidates: the seventh round's on `SSL200_SETTINGS`' encoder."""
    return with_encoder_tag(round7_candidates(ssl_path, SSL200_SETTINGS), "ssl200")


@study(
    "dlmi-round10",
    "the tenth round: the seventh's image heads on an encoder pretrained twice as long",
    round10_arguments,
)
def round10(args: argparse.Namespace) -> Iterator[Record]:
    """The tenth round (docs/results.md): the three image-only SSL heads on `SSL200_SETTINGS`'
    encoder; then the fused twin and the logit sum of the pathway that stands; the verdict."""
    yield from ssl_round(10, args, round10_candidates, image_heads("ssl200"), SSL200_SETTINGS)


def round11_candidates(ssl_path: Path) -> dict[str, dict[str, Any]]:
    """The eleventh round's candidates: the references; ``dlmi_attention.yaml`` on the seventh
    round's SimCLR features with attention and with gated attention (``images_ssl_<pool>``),
    and their fused twins (the recipe with that pooling, ``fused_ssl_<pool>``)."""
    seventh = round7_candidates(ssl_path)
    candidates = {n: seventh[n] for n in (REFERENCE, RECIPE)}
    for pool, model in (("attention", "AttentionMIL"), ("gated_attention", "GatedAttentionMIL")):
        image = load("dlmi_attention.yaml")
        image["model"]["class_path"] = model
        image["model"]["init_args"]["encoder"]["in_dim"] = SSL_SETTINGS.out_dim
        image["data"] = copy.deepcopy(seventh["images_ssl_mean"]["data"])
        fused = copy.deepcopy(seventh["fused_ssl_mean"])
        hidden = image["model"]["init_args"]["attention_hidden"]
        fused["model"]["init_args"]["pooling"] = {"name": pool, "hidden": hidden}
        candidates[f"images_ssl_{pool}"] = image
        candidates[f"fused_ssl_{pool}"] = fused
    return candidates


@study(
    "dlmi-round11",
    "the eleventh round: attention heads on the seventh round's SimCLR features",
    round10_arguments,
)
def round11(args: argparse.Namespace) -> Iterator[Record]:
    """The eleventh round (docs/results.md): attention and gated-attention MIL on the seventh
    round's encoder's features; then the fused twin and the logit sum of the pathway that
    stands; the verdict (the tenth round's rule)."""
    images = ["images_ssl_attention", "images_ssl_gated_attention"]
    yield from ssl_round(11, args, round11_candidates, images)


def round12_candidates(ssl_path: Path) -> dict[str, dict[str, Any]]:
    """The twelfth round's candidates: the references; the seventh round's three image-only
    heads on the same encoder, each crop described by its 8 dihedral views (the mean of their
    features in validation and test, one random view per step in training:
    ``features: {dihedral: true, eval_view: mean}``), ``images_ssl_d4_<summary>``, and their
    fused twins ``fused_ssl_d4_<summary>``."""
    candidates = with_encoder_tag(round7_candidates(ssl_path), "ssl_d4")
    for name, config in candidates.items():
        if "_ssl_d4_" in name:  # round7_candidates builds each config anew: no copy needed
            config["data"]["init_args"]["features"].update(dihedral=True, eval_view="mean")
    return candidates


@study(
    "dlmi-round12",
    "the twelfth round: the seventh round's image heads on rotation-averaged crop features",
    round10_arguments,
)
def round12(args: argparse.Namespace) -> Iterator[Record]:
    """The twelfth round (docs/results.md): the three image-only SSL heads with each crop's
    features averaged over its 8 dihedral views; then the fused twin and the logit sum of the
    pathway that stands; the verdict (the tenth round's rule)."""
    yield from ssl_round(12, args, round12_candidates, image_heads("ssl_d4"))


TUNED_EPOCHS, TUNED_LR = 30, 3e-4
"""The thirteenth round's fine-tuning: epochs (a cosine over them) and AdamW's learning rate,
a tenth of the heads' on frozen features, so that the pretrained encoder moves gently."""


def round13_candidates(ssl_path: Path) -> dict[str, dict[str, Any]]:
    """The thirteenth round's candidates: the references, and ``images_ssl_tuned_mean``: the
    seventh round's encoder (``ssl_path``) fine-tuned on the patients' labels under a mean
    pooling and a linear head (`MeanPoolMIL` on the crops, 64 px of the 112 px centre, the
    default CPU augmentation: flips, rotations, affine, colour), `TUNED_EPOCHS` at
    `TUNED_LR`; everything else the frozen ``images_ssl_mean``'s."""
    seventh = round7_candidates(ssl_path)
    candidates = {n: seventh[n] for n in (REFERENCE, RECIPE)}
    tuned = copy.deepcopy(seventh["images_ssl_mean"])
    tuned["trainer"]["max_epochs"] = TUNED_EPOCHS
    head = tuned["model"]["init_args"]
    head["encoder"] = {
        "name": "small_cnn",
        "kwargs": {"width": SSL_SETTINGS.width},
        "out_dim": SSL_SETTINGS.out_dim,
        "weights": str(ssl_path),
    }
    head["optim"] = {**head["optim"], "lr": TUNED_LR}
    frozen = tuned["data"]["init_args"]
    tuned["data"] = {
        "class_path": "PatientBagDataModule",
        "init_args": {k: frozen[k] for k in ("crops", "max_instances", "loader")},
    }
    candidates["images_ssl_tuned_mean"] = tuned
    return candidates


@study(
    "dlmi-round13",
    "the thirteenth round: the seventh round's encoder fine-tuned on the patients' labels",
    round10_arguments,
)
def round13(args: argparse.Namespace) -> Iterator[Record]:
    """The thirteenth round (docs/results.md): the SimCLR encoder fine-tuned under a mean
    pooling; then the logit sum of the pathway that stands with the clinical model (no fused
    twin); the verdict (the tenth round's rule)."""
    images = ["images_ssl_tuned_mean"]
    yield from ssl_round(13, args, round13_candidates, images, fused_twin=False)


def round14_candidates(ssl_path: Path) -> dict[str, dict[str, Any]]:
    """The fourteenth round's candidates: the seventh round's on an encoder pretrained with
    `SSL96_SETTINGS` on 96 px crops (``ssl_path``), the crops read at 96 px."""
    return with_encoder_tag(round7_candidates(ssl_path, SSL96_SETTINGS, SSL96_SIZE), "ssl96")


@study(
    "dlmi-round14",
    "the fourteenth round: the seventh round's image heads on an encoder pretrained at 96 px",
    round10_arguments,
)
def round14(args: argparse.Namespace) -> Iterator[Record]:
    """The fourteenth round (docs/results.md): `SSL96_SETTINGS`' pretraining on 96 px of the
    112 px centre; the three image-only SSL heads on its features; then the fused twin and the
    logit sum of the pathway that stands; the verdict (the tenth round's rule)."""
    heads = image_heads("ssl96")
    yield from ssl_round(14, args, round14_candidates, heads, SSL96_SETTINGS, SSL96_SIZE)


def round15_candidates(ssl_path: Path) -> dict[str, dict[str, Any]]:
    """The fifteenth round's candidates: the seventh round's on an encoder pretrained with
    DINO instead of SimCLR (`DINO_SETTINGS`; ``ssl_path``)."""
    return with_encoder_tag(round7_candidates(ssl_path, DINO_SETTINGS), "dino")


@study(
    "dlmi-round15",
    "the fifteenth round: the seventh round's image heads on an encoder pretrained with DINO",
    round10_arguments,
)
def round15(args: argparse.Namespace) -> Iterator[Record]:
    """The fifteenth round (docs/results.md): `DINO_SETTINGS`' pretraining (self-distillation,
    lightly) instead of SimCLR's; the three image-only heads on its features; then the fused
    twin and the logit sum of the pathway that stands; the verdict (the tenth round's rule)."""
    yield from ssl_round(15, args, round15_candidates, image_heads("dino"), DINO_SETTINGS)


TEACHER_CONFIDENCE = 0.9
"""The sixteenth round's co-training: an unlabelled patient trains with the clinical teacher's
label if the teacher gives that label at least this probability."""


def round16_candidates(ssl_path: Path, centre: int = 112) -> dict[str, dict[str, Any]]:
    """The sixteenth round's candidates: the references; the seventh round's SSL candidates
    on the same encoder (``ssl_path``, which reads the ``centre`` px centre of the crops) with
    co-training (``split.teacher_confidence``: the unlabelled patients that a clinical teacher
    labels with `TEACHER_CONFIDENCE` train too), ``images_ssl_pl_<summary>`` and
    ``fused_ssl_pl_<summary>``; and the controls, the seventh round's image-only heads as
    they were (``images_ssl_<summary>``)."""
    candidates = with_encoder_tag(round7_candidates(ssl_path, ssl_centre=centre), "ssl_pl")
    for name, config in candidates.items():
        if "_ssl_pl_" in name:  # round7_candidates builds each config anew: no copy needed
            config["data"]["init_args"]["split"] = {"teacher_confidence": TEACHER_CONFIDENCE}
    controls = round7_candidates(ssl_path, ssl_centre=centre)
    return candidates | {n: controls[n] for n in image_heads("ssl")}


def challenge_layout(labelled: Path, unlabelled: Path, folder: Path) -> Path:
    """``folder`` as one DLMI folder of the challenge's layout: ``trainset/`` of ``labelled``
    and ``testset/`` of ``unlabelled`` (links; their csv files come with them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (("trainset", labelled), ("testset", unlabelled)):
        link = folder / name
        if not link.is_symlink():
            link.symlink_to((source / name).resolve(), target_is_directory=True)
        elif link.resolve() != (source / name).resolve():
            raise SystemExit(f"{link} points to {link.resolve()}, not to {source / name}")
    return folder


@study(
    "dlmi-round16",
    "the sixteenth round: the seventh round's image heads co-trained with a clinical teacher",
    round10_arguments,
)
def round16(args: argparse.Namespace) -> Iterator[Record]:
    """The sixteenth round (docs/results.md): the seventh round's encoder (the same crops,
    the same cached weights); its three image-only heads trained on the labelled training
    patients and the unlabelled patients a clinical teacher labels confidently, every
    candidate cross-validated on one folder holding both (the labelled patients' splits are
    the seventh round's); then the fused twin and the logit sum of the pathway that stands;
    the verdict (the tenth round's rule); then the controls, the seventh round's three heads
    without co-training on this encoder, and each head's paired difference to its control."""
    args.out = args.out or Path("runs/benchmarks/dlmi-round16")
    ssl_path, seconds = ssl_weights([args.data, args.unlabelled], args.cache_dir)
    yield pretraining_record(ssl_path, seconds)
    args.data = challenge_layout(args.data, args.unlabelled, args.out / "data")
    candidates = {
        n: with_data(c, args.data, args.cache_dir) for n, c in round16_candidates(ssl_path).items()
    }
    heads, controls = image_heads("ssl_pl"), image_heads("ssl")
    yield from challenge(16, candidates, heads, args)
    yield from (r for r in _rows(candidates, controls, args) if r["candidate"] in controls)
    for own, control in zip(heads, controls, strict=True):
        first, second = (_cv(n, candidates[n], args)[0] for n in (control, own))
        diff = paired_difference(first, second, 2000, 0)
        effect = {m: diff[m] for m in METRICS}
        yield {"record": "co_training_effect", "candidate": own, "control": control, **effect}
    yield teacher_record(args.data, args.out / heads[0])


def teacher_record(folder: Path, out: Path) -> Record:
    """How many unlabelled patients of ``folder`` the clinical teacher labelled (and how many
    of them tumoral) in each fold of the co-trained cross-validation in ``out``."""
    report = json.loads((out / "cv_report.json").read_text())
    counts = []
    for fold in report["per_fold"]:
        split = {k: fold[k] for k in ("train_ids", "val_ids", "test_ids")}
        split["teacher_confidence"] = TEACHER_CONFIDENCE
        labels = PatientBagDataModule(str(folder), split=split)
        counts.append(list(labels.teacher_labels.values()))
    labelled = [len(c) for c in counts]
    return {
        "record": "teacher",
        "unlabelled_patients": sum(b.label == -1 for b in labels.bags.values()),
        "labelled_per_fold": {
            "median": float(np.median(labelled)),
            "range": [min(labelled), max(labelled)],
        },
        "tumoral_per_fold": {"median": float(np.median([sum(c) for c in counts]))},
    }


def round17_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out-sixteenth",
        type=Path,
        default=Path("runs/benchmarks/dlmi-round16"),
        help="the sixteenth round's working folder (the cv outputs of its references and "
        "controls; its records are read from benchmarks/results/dlmi-round16.jsonl)",
    )


@study(
    "dlmi-round17",
    "the seventeenth round: the three image heads' logits averaged (no training)",
    round17_arguments,
)
def round17(args: argparse.Namespace) -> Iterator[Record]:
    """The seventeenth round (docs/results.md): `ensemble_round` of the seventh round's three
    image-only heads (the sixteenth round's controls), judged against the recipe."""
    recorded = sixteenth_records()
    folders = folders_of(args.out_sixteenth)
    yield from ensemble_round(17, folders, recorded, "ssl", recorded[RECIPE])


@study(
    "dlmi-round18",
    "the eighteenth round: the three co-trained image heads' logits averaged (no training)",
    round17_arguments,
)
def round18(args: argparse.Namespace) -> Iterator[Record]:
    """The eighteenth round (docs/results.md): `ensemble_round` of the sixteenth round's three
    co-trained heads, judged against the recipe the seventeenth round's rule adopted (the sum
    of `REFERENCE` and the seventeenth round's ensemble, as recorded)."""
    recorded = sixteenth_records()
    folders = folders_of(args.out_sixteenth)
    (recipe,) = (
        r for r in read_records("dlmi-round17") if r.get("candidate") == "sum_ssl_ensemble"
    )
    ssl = [folders[h] for h in image_heads("ssl")]
    oof = logit_sum(folders[REFERENCE], *ssl, weights=mean_weights(len(ssl), clinical=True))
    yield {k: v for k, v in recipe.items() if k != "study"}
    yield from ensemble_round(18, folders, recorded, "ssl_pl", recipe, {recipe["candidate"]: oof})


def sixteenth_records() -> dict[str, Record]:
    """The sixteenth round's candidate records by name (their ``study`` field left out: they
    are rows of the round that reads them)."""
    return {
        r["candidate"]: {k: v for k, v in r.items() if k != "study"}
        for r in read_records("dlmi-round16")
        if r["record"] == "candidate"
    }


def folders_of(runs: Path) -> dict[str, Path]:
    """The cv output folders in ``runs`` of the references and of the sixteenth round's six
    image-only heads (co-trained or not)."""
    names = [REFERENCE, RECIPE, *image_heads("ssl"), *image_heads("ssl_pl")]
    return {name: runs / name for name in names}


def ensemble_round(
    round_no: int,
    folders: dict[str, Path],
    recorded: dict[str, Record],
    tag: str,
    recipe: Record,
    more_refs: dict[str, pd.DataFrame] | None = None,
) -> Iterator[Record]:
    """A round of the seventeenth round's kind, nothing trained: the references and
    ``images_<tag>_types`` as ``recorded`` (their cv outputs and the heads' in ``folders``);
    ``images_<tag>_ensemble``, the mean of the logits of the three ``images_<tag>_*`` heads,
    with its paired difference to the cell types; the logit sums of `REFERENCE` with the
    ensemble and with the cell types (paired differences to the references and
    ``more_refs``); the verdict (the tenth round's rule: the cell types on the same encoder
    as the pathway to beat, ``recipe`` as the recipe)."""
    control = recorded[f"images_{tag}_types"]
    yield from (recorded[n] for n in (REFERENCE, RECIPE, control["candidate"]))
    oofs = {n: oof_of(folders[n]) for n in (REFERENCE, RECIPE, control["candidate"])}
    refs = {n: oofs[n] for n in (REFERENCE, RECIPE)}
    rows = ensemble_rows(tag, folders, refs, oofs[control["candidate"]], more_refs)
    ensemble = rows["ensemble"]
    yield ensemble
    yield from (rows[k] for k in ("sum_ensemble", "sum_types"))
    stands = above(ensemble["auroc"]["mean"], control["auroc"]["mean"])
    pathway = ensemble if stands else control
    contender = rows["sum_ensemble" if stands else "sum_types"]
    yield challenge_verdict(round_no, ensemble, control, pathway, [contender], recipe)


def mean_weights(n_heads: int, clinical: bool = False) -> list[float]:
    """`logit_sum` weights that average ``n_heads`` image heads' logits, after the clinical
    model's whole logit first with ``clinical``."""
    mean = [1 / n_heads] * n_heads
    return [1.0, *mean] if clinical else mean


def ensemble_rows(
    tag: str,
    folders: dict[str, Path],
    refs: dict[str, pd.DataFrame],
    types_oof: pd.DataFrame,
    more_refs: dict[str, pd.DataFrame] | None = None,
) -> dict[str, Record]:
    """The records made from the three ``images_<tag>_*`` heads' cv outputs (``folders``,
    with `REFERENCE`'s), nothing trained: ``ensemble``, the mean of their logits (paired
    differences to ``refs`` and to the cell types, ``types_oof``); ``sum_ensemble`` and
    ``sum_types``, `REFERENCE`'s logit plus the ensemble's or the cell types' (paired
    differences to ``refs`` and ``more_refs``)."""
    heads = [folders[head] for head in image_heads(tag)]
    mean, with_clinical = mean_weights(len(heads)), mean_weights(len(heads), clinical=True)
    types = f"images_{tag}_types"
    clinical, sum_refs = folders[REFERENCE], refs | (more_refs or {})
    return {
        "ensemble": sum_row(f"images_{tag}_ensemble", heads, refs | {types: types_oof}, mean),
        "sum_ensemble": sum_row(f"sum_{tag}_ensemble", [clinical, *heads], sum_refs, with_clinical),
        "sum_types": sum_row(f"sum_{tag}_types", [clinical, folders[types]], sum_refs),
    }


def round19_arguments(p: argparse.ArgumentParser) -> None:
    round10_arguments(p)
    round17_arguments(p)


@study(
    "dlmi-round19",
    "the nineteenth round: the sixteenth to eighteenth rounds' heads on an encoder pretrained "
    "with another seed",
    round19_arguments,
)
def round19(args: argparse.Namespace) -> Iterator[Record]:
    """The nineteenth round (docs/results.md): `encoder_heads` of an encoder pretrained as the
    seventh round's but for its seed (`SEED1_SETTINGS`); the verdict: is the eighteenth
    round's ``sum_ssl_pl_ensemble`` confirmed (balanced accuracy above `REFERENCE` with the
    interval above 0, AUROC above it), and does it meet the fused bar."""
    args.out = args.out or Path("runs/benchmarks/dlmi-round19")
    rows, _ = yield from encoder_heads(args, SEED1_SETTINGS)
    target = rows["sum_ssl_pl_ensemble"]
    versus = target[f"minus_{REFERENCE}"]
    yield {
        "record": "verdict",
        "round": 19,
        "candidate": target["candidate"],
        "confirmed": above(versus["balanced_accuracy"]["ci95_low"], 0)
        and above(versus["auroc"]["mean"], 0),
        **bars(None, target),
    }


def encoder_heads(
    args: argparse.Namespace, settings: PretrainSettings, centre: int = 112
) -> Generator[Record, None, tuple[dict[str, Record], dict[str, Path]]]:
    """The nineteenth round's records for the encoder pretrained with ``settings`` on the
    ``centre`` px centre of the crops: its pretraining; the sixteenth round's six image-only
    heads on it (three co-trained, three not) on the sixteenth round's folder and splits (its
    references found there, not run again); co-training's effect on each head; both
    ensembles of three heads and the logit sums of `REFERENCE` with them and with the cell
    types. Returns the rows made without training by name and every run's cv folder by
    name."""
    roots = [args.data, args.unlabelled]
    ssl_path, seconds = ssl_weights(roots, args.cache_dir, settings, center_crop=centre)
    yield pretraining_record(ssl_path, seconds)
    args.data = challenge_layout(args.data, args.unlabelled, args.out_sixteenth / "data")
    candidates = {
        n: with_data(c, args.data, args.cache_dir)
        for n, c in round16_candidates(ssl_path, centre).items()
    }
    plain, cotrained = image_heads("ssl"), image_heads("ssl_pl")
    yield from _rows(candidates, [*plain, *cotrained], args, earlier=args.out_sixteenth)
    runs = {
        n: _cv(n, candidates[n], args, args.out_sixteenth)  # every one found, none run again
        for n in (REFERENCE, RECIPE, *plain, *cotrained)
    }
    for own, control in zip(cotrained, plain, strict=True):
        diff = paired_difference(runs[control][0], runs[own][0], 2000, 0)
        effect = {m: diff[m] for m in METRICS}
        yield {"record": "co_training_effect", "candidate": own, "control": control, **effect}
    refs = {n: runs[n][0] for n in (REFERENCE, RECIPE)}
    folders = {n: folder for n, (_, folder) in runs.items()}
    made: dict[str, Record] = {}
    for tag in ("ssl", "ssl_pl"):
        rows = ensemble_rows(tag, folders, refs, runs[f"images_{tag}_types"][0])
        for key in ("ensemble", "sum_types", "sum_ensemble"):
            made[rows[key]["candidate"]] = rows[key]
            yield rows[key]
    return made, folders


@study(
    "dlmi-round24",
    "the twenty-fourth round: the image heads on an encoder pretrained with half of its "
    "positive pairs drawn within a patient",
    round19_arguments,
)
def round24(args: argparse.Namespace) -> Iterator[Record]:
    """The twenty-fourth round (docs/results.md): `encoder_round` of the encoder pretrained
    as the seventh round's but with `PATIENT_PAIRS_SETTINGS` (half of SimCLR's positive pairs
    are two crops of one patient)."""
    args.out = args.out or Path("runs/benchmarks/dlmi-round24")
    yield (yield from encoder_round(24, args, PATIENT_PAIRS_SETTINGS))


def encoder_round(
    round_no: int, args: argparse.Namespace, settings: PretrainSettings, centre: int = 112
) -> Generator[Record, None, Record]:
    """A round of the twenty-fourth round's kind: `encoder_heads` of the encoder pretrained
    with ``settings`` on the ``centre`` px centre of the crops; each head's and each
    ensemble's paired difference to its twin on the seventh round's encoder (the sixteenth
    round's runs); the verdict: a better encoder if the co-trained ensemble's AUROC is above
    that of both SimCLR encoders (the eighteenth and nineteenth rounds' records) and its
    paired AUROC difference to its seed-0 twin has a 95 % interval above 0; issue 19's bars,
    met or not. Yields every record but the verdict, which it returns."""
    rows, folders = yield from encoder_heads(args, settings, centre)
    seed0 = folders_of(args.out_sixteenth)
    effects: dict[str, Record] = {}
    for tag in ("ssl", "ssl_pl"):
        heads = image_heads(tag)
        twins = {head: tuple(oof_of(f[head]) for f in (seed0, folders)) for head in heads}
        twins[f"images_{tag}_ensemble"] = tuple(
            logit_sum(*(f[head] for head in heads), weights=mean_weights(len(heads)))
            for f in (seed0, folders)
        )
        for name, (before, after) in twins.items():
            diff = paired_difference(before, after, 2000, 0)
            effects[name] = {
                "record": "encoder_effect",
                "candidate": name,
                "control": f"{name} (SimCLR, seed 0)",
                **{m: diff[m] for m in METRICS},
            }
            yield effects[name]
    target = rows["images_ssl_pl_ensemble"]
    simclr_best = max(
        r["auroc"]["mean"]
        for study_name in ("dlmi-round18", "dlmi-round19")
        for r in read_records(study_name)
        if r.get("candidate") == "images_ssl_pl_ensemble"
    )
    return {
        "record": "verdict",
        "round": round_no,
        "candidate": target["candidate"],
        "simclr_best_auroc": simclr_best,
        "better_encoder": above(target["auroc"]["mean"], simclr_best)
        and above(effects[target["candidate"]]["auroc"]["ci95_low"], 0),
        **bars(target, rows["sum_ssl_pl_ensemble"]),
    }


LOGIT_SUM = "logit_sum_ssl"
"""The twentieth round's candidate: ``dlmi_logit_sum.yaml`` (`LogitSumMIL`) on the seventh
round's encoder; ``logit_sum_ssl_pl`` is the same with co-training."""


def round20_candidates(ssl_path: Path, expert_selection: bool = False) -> dict[str, dict[str, Any]]:
    """The twentieth round's candidates: the references (`round16_candidates`', found in the
    sixteenth round's folder) and ``dlmi_logit_sum.yaml`` with the weights ``ssl_path``
    (`LOGIT_SUM`) and co-trained (``split.teacher_confidence``: `TEACHER_CONFIDENCE`); without
    ``expert_selection``, as the twentieth round ran it: one checkpoint epoch for the whole
    model, chosen by the validation loss."""
    references = round16_candidates(ssl_path)
    plain = load("dlmi_logit_sum.yaml")
    plain["data"]["init_args"]["features"]["weights"] = str(ssl_path)
    if not expert_selection:
        plain["model"]["init_args"]["expert_selection"] = False
        plain["checkpoint"] = references[RECIPE]["checkpoint"]  # val_loss
    cotrained = copy.deepcopy(plain)
    cotrained["data"]["init_args"]["split"] = {"teacher_confidence": TEACHER_CONFIDENCE}
    return {n: references[n] for n in (REFERENCE, RECIPE)} | {
        LOGIT_SUM: plain,
        f"{LOGIT_SUM}_pl": cotrained,
    }


@study(
    "dlmi-round20",
    "the twentieth round: the logit sum of the seventeenth to nineteenth rounds as one model "
    "(LogitSumMIL)",
    round19_arguments,
)
def round20(args: argparse.Namespace) -> Iterator[Record]:
    """The twentieth round (docs/results.md): `logit_sum_round` of `LogitSumMIL` without
    expert selection."""
    args.out = args.out or Path("runs/benchmarks/dlmi-round20")
    yield from logit_sum_round(20, args, round20_candidates)


def with_round_folder(
    flag: str, round_no: int, help: str
) -> Callable[[argparse.ArgumentParser], None]:
    """The nineteenth round's arguments plus ``--out-<flag>``, the working folder of the
    round ``round_no`` (``help`` says what it holds)."""

    def arguments(p: argparse.ArgumentParser) -> None:
        round19_arguments(p)
        p.add_argument(
            f"--out-{flag}",
            type=Path,
            default=Path(f"runs/benchmarks/dlmi-round{round_no}"),
            help=help,
        )

    return arguments


round21_arguments = with_round_folder(
    "twentieth", 20, "the twentieth round's working folder (its candidates' cv outputs)"
)


@study(
    "dlmi-round21",
    "the twenty-first round: LogitSumMIL with each expert kept at its own best epoch",
    round21_arguments,
)
def round21(args: argparse.Namespace) -> Iterator[Record]:
    """The twenty-first round (docs/results.md): `logit_sum_round` of `LogitSumMIL` with
    ``expert_selection``; then each candidate's paired difference to its twentieth-round
    twin (one checkpoint epoch for the whole model), read from ``args.out_twentieth``."""
    args.out = args.out or Path("runs/benchmarks/dlmi-round21")
    records = list(
        logit_sum_round(21, args, lambda path: round20_candidates(path, expert_selection=True))
    )
    yield from records
    for name in (LOGIT_SUM, f"{LOGIT_SUM}_pl"):
        own, twin = (oof_of(folder / name) for folder in (args.out, args.out_twentieth))
        diff = paired_difference(twin, own, 2000, 0)
        effect = {m: diff[m] for m in METRICS}
        yield {"record": "selection_effect", "candidate": name, "control": f"{name} (20)", **effect}


def logit_sum_round(
    round_no: int,
    args: argparse.Namespace,
    candidates_of: Callable[[Path], dict[str, dict[str, Any]]],
    settings: PretrainSettings = SSL_SETTINGS,
    heads_folder: Path | None = None,
) -> Iterator[Record]:
    """A round of the twentieth round's kind: the ``candidates_of(weights)`` (the references
    and the two `LogitSumMIL` candidates) on the encoder pretrained with ``settings`` (the
    seventh round's), cross-validated on the sixteenth round's folder and splits (the
    references found there, not run again); paired differences to the references and to the
    separately trained sums of the same encoder's heads (their runs in ``heads_folder``, by
    default the sixteenth round's); the verdict (`logit_sum_verdict`)."""
    ssl_path, seconds = ssl_weights([args.data, args.unlabelled], args.cache_dir, settings)
    yield pretraining_record(ssl_path, seconds)
    args.data = challenge_layout(args.data, args.unlabelled, args.out_sixteenth / "data")
    candidates = {
        n: with_data(c, args.data, args.cache_dir) for n, c in candidates_of(ssl_path).items()
    }
    runs = {n: _cv(n, config, args, args.out_sixteenth) for n, config in candidates.items()}
    refs = {n: runs[n][0] for n in (REFERENCE, RECIPE)}
    separate = folders_of(heads_folder or args.out_sixteenth)
    separate[REFERENCE] = args.out_sixteenth / REFERENCE
    for tag in ("ssl", "ssl_pl"):
        heads = [separate[h] for h in image_heads(tag)]
        weights = mean_weights(len(heads), clinical=True)
        refs[f"sum_{tag}_ensemble"] = logit_sum(separate[REFERENCE], *heads, weights=weights)
    rows = {n: _row(n, oof, refs, out) for n, (oof, out) in runs.items()}
    yield from rows.values()
    yield logit_sum_verdict(round_no, rows)


round22_arguments = with_round_folder(
    "nineteenth", 19, "the nineteenth round's working folder (the seed-1 encoder's six heads)"
)


@study(
    "dlmi-round22",
    "the twenty-second round: the twenty-first round's LogitSumMIL on the seed-1 encoder",
    round22_arguments,
)
def round22(args: argparse.Namespace) -> Iterator[Record]:
    """The twenty-second round (docs/results.md), a replication: `logit_sum_round` of the
    twenty-first round's candidates on the nineteenth round's encoder (`SEED1_SETTINGS`),
    compared with the separately trained sums of that encoder's heads (``args.out_nineteenth``);
    the verdict says whether each would qualify there; nothing ships from it."""
    args.out = args.out or Path("runs/benchmarks/dlmi-round22")
    for record in logit_sum_round(
        22,
        args,
        lambda path: round20_candidates(path, expert_selection=True),
        SEED1_SETTINGS,
        args.out_nineteenth,
    ):
        if record["record"] == "verdict":  # a replication: what would ship, nothing does
            record = {**record, "would_ship": record["shipped"], "shipped": None}
        yield record


def same_patient_neighbours(features: np.ndarray, patients: np.ndarray) -> float:
    """The share of crops whose nearest other crop (cosine, features standardised) is of the
    same patient: how much of the smear, rather than of the cell, the features hold."""
    from sklearn.neighbors import NearestNeighbors

    scaled = (features - features.mean(0)) / np.maximum(features.std(0), 1e-6)
    nearest = NearestNeighbors(n_neighbors=2, metric="cosine").fit(scaled)
    _, index = nearest.kneighbors(scaled)
    other = np.where(index[:, 0] == np.arange(len(scaled)), index[:, 1], index[:, 0])
    return round(float(np.mean(patients[other] == patients)), 3)


def colour_statistics(pixels: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Per crop of ``pixels`` (uint8 ``[M, S, S, 3]``), over the pixels ``where`` (bool
    ``[S, S]``) say: each channel's mean, standard deviation and 10, 50 and 90 % quantiles
    (``[M, 15]``)."""
    values = pixels[:, where].astype(np.float32)  # [M, P, 3]
    quantiles = np.percentile(values, [10, 50, 90], axis=1).transpose(1, 0, 2)
    return np.concatenate(
        [values.mean(1), values.std(1), quantiles.reshape(len(values), -1)], axis=1
    )


def per_patient_standardised(pixels: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """``pixels`` (uint8 ``[M, S, S, 3]``) with each patient's pixels moved, channel by
    channel, to the mean and standard deviation of every patient's pixels together (the
    simplest stain normalisation per smear; ``patients``: int ``[M]``)."""
    values = pixels.astype(np.float32)
    mean, std = values.reshape(-1, 3).mean(0), values.reshape(-1, 3).std(0)
    for patient in np.unique(patients):
        own = values[patients == patient]
        flat = own.reshape(-1, 3)
        spread = np.maximum(flat.std(0), 1e-6)  # one colour throughout: moved, not scaled
        values[patients == patient] = (own - flat.mean(0)) / spread * std + mean
    return np.clip(values, 0, 255).round().astype(np.uint8)


@study(
    "dlmi-patient-neighbours",
    "label-free diagnostic of the twenty-fourth round: how often a crop's nearest neighbour "
    "is of its own patient, under each pretrained encoder",
    round10_arguments,
)
def patient_neighbours(args: argparse.Namespace) -> Iterator[Record]:
    """After the twenty-fourth round's verdict (docs/results.md), labels unused: for the
    crops of ``args.data``, the share whose nearest other crop is of the same patient
    (`same_patient_neighbours`) by chance; under colour alone (the crop's mean colour, and
    `colour_statistics` of the whole crop, of its centre and of its outer ring, and of the
    whole crop after `per_patient_standardised`); and under the features of the encoders
    pretrained with SimCLR (seeds 0 and 1) and with patient pairs (each loaded from the
    cache, pretrained as its round did), and of SimCLR's seed-0 encoder on the standardised
    crops."""
    crops = CropSettings(image_size=64, center_crop=112, cache_dir=args.cache_dir)
    (pixels,), (patients,) = folder_crops([args.data], crops)
    counts = np.bincount(patients)
    chance = (counts * (counts - 1)).sum() / (len(patients) * (len(patients) - 1))
    yield {"record": "neighbours", "features": "chance", "same_patient": round(float(chance), 3)}
    standardised = per_patient_standardised(pixels, patients)
    side = pixels.shape[1]
    radius = np.hypot(*(np.mgrid[:side, :side] - (side - 1) / 2))
    colours = {
        "mean colour (3 numbers)": pixels.reshape(len(pixels), -1, 3).mean(1),
        "colour statistics, whole crop (15 numbers)": colour_statistics(pixels, radius >= 0),
        "colour statistics, centre (r < 3/16 of the side)": colour_statistics(
            pixels, radius < side * 3 / 16
        ),
        "colour statistics, outer ring (r > 7/16 of the side)": colour_statistics(
            pixels, radius > side * 7 / 16
        ),
        "colour statistics, whole crop, colours standardised per patient": colour_statistics(
            standardised, radius >= 0
        ),
    }
    for name, colour in colours.items():
        yield {
            "record": "neighbours",
            "features": name,
            "same_patient": same_patient_neighbours(colour, patients),
        }
    encoders = {
        "SimCLR, seed 0": (SSL_SETTINGS, pixels),
        "SimCLR, seed 1": (SEED1_SETTINGS, pixels),
        "patient pairs 0.5, seed 0": (PATIENT_PAIRS_SETTINGS, pixels),
        "SimCLR, seed 0, colours standardised per patient": (SSL_SETTINGS, standardised),
    }
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (crops.mean, crops.std))
    for name, (settings, seen) in encoders.items():
        path, _ = ssl_weights([args.data, args.unlabelled], args.cache_dir, settings)
        encoder = SmallCNN(**settings.encoder_kwargs)
        encoder.load_state_dict(torch.load(path, weights_only=True))
        x = (torch.from_numpy(seen).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.inference_mode():
            features = torch.cat([encoder.eval()(batch) for batch in x.split(512)]).numpy()
        yield {
            "record": "neighbours",
            "features": name,
            "same_patient": same_patient_neighbours(features, patients),
        }


round25_arguments = with_round_folder(
    "twentyfourth",
    24,
    "the twenty-fourth round's working folder (the patient-pairs encoder's six heads)",
)


@study(
    "dlmi-round25",
    "the twenty-fifth round: the twenty-first round's LogitSumMIL on the twenty-fourth "
    "round's encoder (positive pairs within a patient)",
    round25_arguments,
)
def round25(args: argparse.Namespace) -> Iterator[Record]:
    """The twenty-fifth round (docs/results.md), run only if the twenty-fourth round's
    verdict found a better encoder: `logit_sum_round` of the twenty-first round's candidates
    on `PATIENT_PAIRS_SETTINGS`' encoder, compared with the separately trained sums of its
    heads (``args.out_twentyfourth``); the twenty-first round's rule decides what ships."""
    verdicts = [r for r in read_records("dlmi-round24") if r["record"] == "verdict"]
    if len(verdicts) != 1:
        raise SystemExit("run the twenty-fourth round first: benchmarks/results/dlmi-round24.jsonl")
    if not verdicts[0]["better_encoder"]:
        raise SystemExit("the twenty-fourth round found no better encoder: this round does not run")
    args.out = args.out or Path("runs/benchmarks/dlmi-round25")
    yield from logit_sum_round(
        25,
        args,
        lambda path: round20_candidates(path, expert_selection=True),
        PATIENT_PAIRS_SETTINGS,
        args.out_twentyfourth,
    )


CENTRE_160 = 160
"""The twenty-seventh round's crop centre: the whole cell and the red cells around it."""

CENTRE_LOGIT_SUM = f"{LOGIT_SUM}_centre160"
"""The twenty-seventh round's `LogitSumMIL`: `LOGIT_SUM` on the `CENTRE_160` encoder."""


@study(
    "dlmi-round27",
    "the twenty-seventh round: the image heads and LogitSumMIL on an encoder pretrained on "
    "the 160 px centre of the crops",
    with_round_folder(
        "twentysixth",
        26,
        "the twenty-sixth round's working folder (LogitSumMIL on the seed-0 encoder, rerun)",
    ),
)
def round27(args: argparse.Namespace) -> Iterator[Record]:
    """The twenty-seventh round (docs/results.md): `encoder_round` of the seventh round's
    SimCLR pretrained on 64 px of the `CENTRE_160` px centre instead of the 112 px one; then
    the twenty-first round's `LogitSumMIL` (`LOGIT_SUM`) on it, beside the same model on the
    112 px encoder (found in the twenty-sixth round's folder, else run); the verdict
    (`round27_verdict`)."""
    args.out = args.out or Path("runs/benchmarks/dlmi-round27")
    roots = [args.data, args.unlabelled]
    verdict = yield from encoder_round(27, args, SSL_SETTINGS, CENTRE_160)
    encoders = {LOGIT_SUM: (SSL_SETTINGS, 112), CENTRE_LOGIT_SUM: (SSL_SETTINGS, CENTRE_160)}
    earlier = {LOGIT_SUM: args.out_twentysixth}
    rows = logit_sum_rows(args, roots, encoders, earlier, (REFERENCE, RECIPE, LOGIT_SUM))
    yield from (rows[n] for n in (LOGIT_SUM, CENTRE_LOGIT_SUM))
    yield round27_verdict(verdict, rows)


def logit_sum_rows(
    args: argparse.Namespace,
    roots: list[Path],
    encoders: dict[str, tuple[PretrainSettings, int]],
    earlier: dict[str, Path],
    refs: Sequence[str],
) -> dict[str, Record]:
    """The twenty-first round's `LogitSumMIL` (`LOGIT_SUM`, each expert at its own best
    epoch) on each of ``encoders`` (by candidate name: the settings of its pretraining on the
    crops of ``roots`` and the crop centre it reads), beside `REFERENCE` and `RECIPE`, on
    ``args.data``: every run's row by name, with its paired differences to the ``refs`` runs.
    The references are found in ``args.out_sixteenth``, a model in ``earlier`` (by name) or
    ``args.out``, else run."""
    configs: dict[str, dict[str, Any]] = {}
    for name, (settings, centre) in encoders.items():
        ssl_path, _ = ssl_weights(roots, args.cache_dir, settings, center_crop=centre)
        candidates = round20_candidates(ssl_path, expert_selection=True)
        if not configs:  # the references read no encoder: taken once
            configs = {n: candidates[n] for n in (REFERENCE, RECIPE)}
        configs[name] = candidates[LOGIT_SUM]
        configs[name]["data"]["init_args"]["crops"]["center_crop"] = centre
    earlier = {REFERENCE: args.out_sixteenth, RECIPE: args.out_sixteenth} | earlier
    runs = {
        n: _cv(n, with_data(c, args.data, args.cache_dir), args, earlier.get(n))
        for n, c in configs.items()
    }
    ref_oofs = {n: runs[n][0] for n in refs}
    return {n: _row(n, oof, ref_oofs, out) for n, (oof, out) in runs.items()}


def round27_verdict(encoder: Record, rows: dict[str, Record]) -> Record:
    """The twenty-seventh round's rule (docs/results.md), from the encoder's verdict
    (`encoder_round`) and the `LogitSumMIL` rows: the 160 px centre replaces the 112 px one
    in the SSL configs if it makes a better encoder; `CENTRE_LOGIT_SUM` ships as the recipe
    if, in addition, it `qualifies` and beats `LOGIT_SUM` (the 112 px encoder's) in both
    metrics; issue 19's fused bar for it, met or not."""
    model = rows[CENTRE_LOGIT_SUM]
    checks = {
        "better_encoder": encoder["better_encoder"],
        "qualifies": qualifies(model, rows[RECIPE]),
        "beats_logit_sum": beats(model, rows[LOGIT_SUM]),
    }
    return {
        **encoder,
        **checks,
        "adopt_centre_160": checks["better_encoder"],
        "shipped": CENTRE_LOGIT_SUM if all(checks.values()) else None,
        f"bars_{CENTRE_LOGIT_SUM}": bars(None, model),
    }


STAIN_SETTINGS = replace(SSL_SETTINGS, stain_jitter=0.3)  # PretrainSettings() since then
"""The twenty-eighth round's pretraining: the seventh round's SimCLR with every view's stains
redrawn (`StainJitter`, each stain's optical density scaled within 1 +/- 0.3)."""

STAIN_LOGIT_SUM = f"{LOGIT_SUM}_stain"
"""The twenty-eighth round's `LogitSumMIL`: `LOGIT_SUM` on the `STAIN_SETTINGS` encoder."""


@study(
    "dlmi-round28",
    "the twenty-eighth round: the image heads and LogitSumMIL on an encoder pretrained on "
    "views whose stains are redrawn",
    round19_arguments,
)
def round28(args: argparse.Namespace) -> Iterator[Record]:
    """The twenty-eighth round (docs/results.md): `encoder_heads` of the encoder pretrained
    with `STAIN_SETTINGS`; the twenty-first round's `LogitSumMIL` on it (`STAIN_LOGIT_SUM`);
    the verdict (`round28_verdict`), against the records of the SimCLR encoders (no encoder
    of the seventh round's settings is pretrained again in this round)."""
    args.out = args.out or Path("runs/benchmarks/dlmi-round28")
    roots = [args.data, args.unlabelled]
    heads, _ = yield from encoder_heads(args, STAIN_SETTINGS)
    encoders = {STAIN_LOGIT_SUM: (STAIN_SETTINGS, 112)}
    rows = logit_sum_rows(args, roots, encoders, {}, (REFERENCE, RECIPE))
    yield rows[STAIN_LOGIT_SUM]
    yield round28_verdict(heads, rows)


def recorded(study_name: str, candidate: str) -> Record:
    """The candidate record of ``candidate`` in ``benchmarks/results/<study_name>.jsonl``."""
    (row,) = (
        r
        for r in read_records(study_name)
        if r["record"] == "candidate" and r["candidate"] == candidate
    )
    return row


def round28_verdict(heads: dict[str, Record], rows: dict[str, Record]) -> Record:
    """The twenty-eighth round's rule (docs/results.md): stain jitter makes a better encoder if
    the co-trained ensemble's AUROC (``heads``, `encoder_heads`' rows) is above that of both
    SimCLR encoders (the eighteenth and nineteenth rounds' records); `STAIN_LOGIT_SUM`
    (``rows``) ships as the recipe if, in addition, it `qualifies` and beats `LOGIT_SUM` on
    both SimCLR encoders (the twenty-first and twenty-second rounds' records) in both metrics;
    issue 19's bars, met or not."""
    ensemble, model = heads["images_ssl_pl_ensemble"], rows[STAIN_LOGIT_SUM]
    simclr = [recorded(f"dlmi-round{n}", ensemble["candidate"]) for n in (18, 19)]
    simclr_sums = [recorded(f"dlmi-round{n}", LOGIT_SUM) for n in (21, 22)]
    checks = {
        "better_encoder": all(above(ensemble["auroc"]["mean"], r["auroc"]["mean"]) for r in simclr),
        "qualifies": qualifies(model, rows[RECIPE]),
        "beats_logit_sums": all(beats(model, r) for r in simclr_sums),
    }
    return {
        "record": "verdict",
        "round": 28,
        "candidate": ensemble["candidate"],
        "simclr_best_auroc": max(r["auroc"]["mean"] for r in simclr),
        **checks,
        "adopt_stain_jitter": checks["better_encoder"],
        "shipped": STAIN_LOGIT_SUM if all(checks.values()) else None,
        **bars(ensemble, heads["sum_ssl_pl_ensemble"]),
        f"bars_{STAIN_LOGIT_SUM}": bars(None, model),
    }


BAG = 5
"""The twenty-ninth round's bag: ``cv --cv.inner_folds 5``, five models a fold."""

BAGGED = (REFERENCE, "images_ssl_pl_types", STAIN_LOGIT_SUM)
"""The twenty-eighth round's runs that the twenty-ninth bags: the clinical model, the shipped
image pathway and the one-model logit sum."""


def bagged(name: str) -> str:
    """The twenty-ninth round's name of the bagged twin of ``name``."""
    return f"{name}_bag{BAG}"


@study(
    "dlmi-round29",
    "the twenty-ninth round: each fold's model averaged over five inner folds (a bag), the "
    "threshold chosen on every training patient",
    with_round_folder(
        "twentyeighth", 28, "the twenty-eighth round's working folder (the twins of the bags)"
    ),
)
def round29(args: argparse.Namespace) -> Iterator[Record]:
    """The twenty-ninth round (docs/results.md): the `BAGGED` configs of the twenty-eighth
    round (its stain-jittered encoder, folder and splits; their runs found in ``args.out``
    or ``args.out_twentyeighth``, else run) and their bagged twins (`BAG` inner folds); paired
    differences to `REFERENCE`, its bagged twin and `RECIPE`; each bag against its twin
    (``bagging_effect``); the verdict (`round29_verdict`)."""
    args.out = args.out or Path("runs/benchmarks/dlmi-round29")
    ssl_path, seconds = ssl_weights([args.data, args.unlabelled], args.cache_dir, STAIN_SETTINGS)
    yield pretraining_record(ssl_path, seconds)
    args.data = challenge_layout(args.data, args.unlabelled, args.out_sixteenth / "data")
    model = round20_candidates(ssl_path, expert_selection=True)[LOGIT_SUM]
    model["data"]["init_args"]["crops"]["center_crop"] = 112  # as logit_sum_rows builds it
    configs = round16_candidates(ssl_path) | {STAIN_LOGIT_SUM: model}
    configs = {n: with_data(configs[n], args.data, args.cache_dir) for n in (*BAGGED, RECIPE)}
    runs = {n: _cv(n, c, args, args.out_twentyeighth) for n, c in configs.items()}
    runs |= {bagged(n): _cv(bagged(n), configs[n], args, inner_folds=BAG) for n in BAGGED}
    refs = {n: runs[n][0] for n in (REFERENCE, bagged(REFERENCE), RECIPE)}
    rows = {n: _row(n, oof, refs, out) for n, (oof, out) in runs.items()}
    yield from rows.values()
    for name in BAGGED:
        diff = paired_difference(runs[name][0], runs[bagged(name)][0], 2000, 0)
        effect = {m: diff[m] for m in METRICS}
        yield {"record": "bagging_effect", "candidate": bagged(name), "control": name, **effect}
    yield round29_verdict(rows)


def round29_verdict(rows: dict[str, Record]) -> Record:
    """The twenty-ninth round's rule (docs/results.md): bagging helps if at least two of the
    three bags beat their twins in both metrics; the bagged `STAIN_LOGIT_SUM` qualifies if it
    `qualifies` against both the clinical model and its bag; issue 19's bars, met or not, for
    the bagged image pathway and the bagged logit sum. Nothing ships: a bag trains five
    times, over issue 19's ten-minute budget for the recipe's cross-validation."""
    wins = {bagged(n): beats(rows[bagged(n)], rows[n]) for n in BAGGED}
    model = rows[bagged(STAIN_LOGIT_SUM)]
    versus_bag = {**model, f"minus_{REFERENCE}": model[f"minus_{bagged(REFERENCE)}"]}
    images = rows[bagged("images_ssl_pl_types")]
    return {
        "record": "verdict",
        "round": 29,
        "beats_twin": wins,
        "bagging_helps": sum(wins.values()) >= 2,
        "qualifies": qualifies(model, rows[RECIPE]) and qualifies(versus_bag, rows[RECIPE]),
        "whole_cv_s": {n: rows[n]["whole_cv_s"] for n in rows},
        **{k: v for k, v in bars(images, model).items() if "images" in k},
        f"bars_{model['candidate']}": bars(None, model),
        f"bars_{model['candidate']}_versus_bag": bars(None, versus_bag),
    }


@study(
    "dlmi-round23",
    "the twenty-third round: the image heads of two encoders averaged (no training)",
    round22_arguments,
)
def round23(args: argparse.Namespace) -> Iterator[Record]:
    """The twenty-third round (docs/results.md), nothing trained: for the heads without and
    with co-training, the mean of the logits of the three image-only heads of both encoders
    (seed 0: the sixteenth round's runs; seed 1: the nineteenth's), with its paired
    differences to the references and to the shipped image pathway (``images_ssl_pl_types``),
    and its logit sum with `REFERENCE`; the verdict: issue 19's bars, met or not (nothing
    ships: no model reads two encoders)."""
    seed0, seed1 = folders_of(args.out_sixteenth), folders_of(args.out_nineteenth)
    pathway = "images_ssl_pl_types"
    oofs = {n: oof_of(seed0[n]) for n in (REFERENCE, RECIPE, pathway)}
    refs = {n: oofs[n] for n in (REFERENCE, RECIPE)}
    verdict: Record = {"record": "verdict", "round": 23, "shipped": None}
    for tag, name in (("ssl", "2enc"), ("ssl_pl", "2enc_pl")):
        heads = [folders[h] for folders in (seed0, seed1) for h in image_heads(tag)]
        mean, with_clinical = mean_weights(len(heads)), mean_weights(len(heads), clinical=True)
        images = sum_row(f"images_{name}_ensemble", heads, refs | {pathway: oofs[pathway]}, mean)
        fused = sum_row(f"sum_{name}_ensemble", [seed0[REFERENCE], *heads], refs, with_clinical)
        yield from (images, fused)
        verdict[f"bars_{name}"] = bars(images, fused)
    yield verdict


def qualifies(row: Record, recipe: Record) -> bool:
    """The twentieth round's conditions: ``row``'s balanced-accuracy gain over `REFERENCE`
    has a 95 % interval above 0, its AUROC difference is above 0, and it beats ``recipe``
    (`RECIPE`'s row) in both metrics."""
    versus = row[f"minus_{REFERENCE}"]
    return (
        above(versus["balanced_accuracy"]["ci95_low"], 0)
        and above(versus["auroc"]["mean"], 0)
        and beats(row, recipe)
    )


def logit_sum_verdict(round_no: int, rows: dict[str, Record]) -> Record:
    """The rule of the twentieth and twenty-first rounds (docs/results.md): a `LogitSumMIL`
    candidate qualifies if its balanced-accuracy gain over `REFERENCE` has a 95 % interval
    above 0, its AUROC difference is above 0, and it beats `RECIPE` in both metrics; of two
    that qualify, the one without co-training ships unless the co-trained one beats it in
    both metrics."""
    plain, cotrained = rows[LOGIT_SUM], rows[f"{LOGIT_SUM}_pl"]
    qualified = {r["candidate"]: qualifies(r, rows[RECIPE]) for r in (plain, cotrained)}
    shipped: Record | None = None
    if qualified[LOGIT_SUM] and qualified[f"{LOGIT_SUM}_pl"]:
        shipped = cotrained if beats(cotrained, plain) else plain
    elif any(qualified.values()):
        shipped = plain if qualified[LOGIT_SUM] else cotrained
    return {
        "record": "verdict",
        "round": round_no,
        "qualifies": qualified,
        "shipped": None if shipped is None else shipped["candidate"],
        **{f"bars_{r['candidate']}": bars(None, r) for r in (plain, cotrained)},
    }


def challenge(
    round_no: int,
    candidates: dict[str, dict[str, Any]],
    images: list[str],
    args: argparse.Namespace,
    fused_twin: bool = True,
) -> Iterator[Record]:
    """A round that challenges the seventh round's image pathway (the tenth and later): the
    ``images`` candidates cross-validated beside the references; the pathway that stands
    (`challenge_verdict`), its fused twin (``fused_*``; left out without ``fused_twin``) and
    its logit sum with `REFERENCE` (``sum_*``): run if the round's own pathway stands, else the
    seventh round's twin and the ninth round's sum as recorded (their cross-validations are
    those of the seventh round's splits and configs, so running them again gives the records
    bit for bit); the verdict."""
    candidates = {n: with_data(c, args.data, args.cache_dir) for n, c in candidates.items()}
    rows = _rows(candidates, images, args, earlier=args.out_seventh)
    yield from rows
    seventh = {r["candidate"]: r for r in read_records("dlmi-round7") if r["record"] == "candidate"}
    before = seventh["images_ssl_types"]
    own = image_pathway(rows)
    pathway = own if above(own["auroc"]["mean"], before["auroc"]["mean"]) else before
    summary = pathway["candidate"].removeprefix("images_")
    contenders: list[Record] = []
    if pathway is before:
        ninth = {
            r["candidate"]: r for r in read_records("dlmi-round9") if r["record"] == "candidate"
        }
        contenders = [seventh[f"fused_{summary}"]] if fused_twin else []
        contenders.append(ninth[f"sum_{summary}"])
    else:
        if fused_twin:
            fused = _rows(candidates, [f"fused_{summary}"], args)
            contenders.append({r["candidate"]: r for r in fused}[f"fused_{summary}"])
        refs = {n: _cv(n, candidates[n], args, args.out_seventh) for n in (REFERENCE, RECIPE)}
        oofs = {n: oof for n, (oof, _) in refs.items()}
        own_out = args.out / own["candidate"]
        contenders.append(sum_row(f"sum_{summary}", [refs[REFERENCE][1], own_out], oofs))
    yield from contenders
    recipe = {r["candidate"]: r for r in rows}[RECIPE]
    yield challenge_verdict(round_no, own, before, pathway, contenders, recipe)


def challenge_verdict(
    round_no: int,
    own: Record,
    before: Record,
    pathway: Record,
    contenders: list[Record],
    recipe: Record,
) -> Record:
    """The rule of the tenth and later rounds (docs/results.md): the round's pathway ``own``
    replaces ``before`` if its AUROC is higher; of the standing ``pathway``'s fused twin and
    logit sum (``contenders``), those beating ``recipe`` in balanced accuracy and AUROC, the
    one of higher balanced accuracy becomes the recipe; the bars, met or not."""
    winners = [r for r in contenders if beats(r, recipe)]
    chosen = max(winners, key=lambda r: r["balanced_accuracy"]["mean"]) if winners else None
    image_bars = {k: v for k, v in bars(pathway, contenders[0]).items() if "images" in k}
    return {
        "record": "verdict",
        "round": round_no,
        "own_pathway": own["candidate"],
        "image_pathway": pathway["candidate"],
        "replaces": before["candidate"] if pathway is own else None,
        "adopted_as_recipe": chosen["candidate"] if chosen else None,
        **image_bars,
        **{f"bars_{r['candidate']}": bars(None, r) for r in contenders},
    }
