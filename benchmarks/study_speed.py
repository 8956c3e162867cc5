"""Speed studies of the harness (figures and machines: ``benchmarks/README.md``, *Speed*).

- ``import-times``: wall time of a fresh interpreter that imports ``torch``, ``lympho_mil``,
  ``lympho_mil.nn`` or ``lympho_mil.models``, each run ``--runs`` times in turn; medians and
  ratios to ``import torch`` measured in the same run (absolute times move with the machine's
  load, ratios much less).
- ``loader-throughput``: crops per second of the training loader, decoded-crop cache against
  decoding every JPEG (``--stages``: each loader step alone).
- ``fit-epoch``: seconds per training epoch of the quickstart model.
- ``cv-cached``: a 5-fold cross-validation of ``AttentionMIL`` on cached crop features.
- ``evaluate-speed``: ``lympho-mil evaluate`` of the DLMI folder's patients on cached features.
- ``eval-memory``: peak memory of evaluating a 200-crop bag with a ResNet-18, per chunk size.
- ``gpu-throughput``: training crops per second on CUDA, the real pipeline against the
  loader's batches replayed from the device (``run_gpu.sh`` runs it with the CUDA tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from harness import HERE, Record, quiet_trainer, study
from torch.utils.data import DataLoader, Dataset

from lympho_mil.data import (
    Augmentation,
    BagBatch,
    BagSample,
    CropSettings,
    LoaderSettings,
    PatientBagDataModule,
    SplitSettings,
    collate_bags,
)
from lympho_mil.data.image_cache import CropSpec, decode_crop
from lympho_mil.data.transforms import BagAugment, BagToTensor, train_augmentation
from lympho_mil.features import CachedFeatureDataModule, FeatureCache
from lympho_mil.models import AttentionMIL, GatedFusionMIL, OptimSettings
from lympho_mil.nn import EncoderSettings, PoolingSettings

IMPORTS = ("torch", "lympho_mil", "lympho_mil.nn", "lympho_mil.models")
MIB = 2**20


# import-times ------------------------------------------------------------------------------


def _import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=7)


@study(
    "import-times", "import time of lympho_mil and lympho_mil.nn against torch", import_arguments
)
def import_times(args: argparse.Namespace) -> Iterator[Record]:
    times: dict[str, list[float]] = {m: [] for m in IMPORTS}
    for _ in range(args.runs):
        for module in IMPORTS:  # interleaved: a load change hits every module alike
            times[module].append(_import_seconds(module))
    torch_median = statistics.median(times["torch"])
    for module, seconds in times.items():
        median = statistics.median(seconds)
        yield {
            "record": "import",
            "module": module,
            "median_s": round(median, 3),
            "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3),
            "ratio_to_torch": round(median / torch_median, 2),
            "runs": args.runs,
        }


# loader-throughput -------------------------------------------------------------------------

LOADER_AUGMENT = {"none": "none", "cpu": "cpu", "gpu": "gpu", "albumentations": "cpu"}


class NaiveStore:
    """Rows -> uint8[n, S, S, 3], decoding each file with PIL on every access."""

    def __init__(self, paths: list[Path], spec: CropSpec) -> None:
        self.paths, self.spec = paths, spec

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([decode_crop(self.paths[r], self.spec) for r in rows])


def row_paths(dm: PatientBagDataModule) -> list[Path]:
    """The file behind every row of the datamodule's store."""
    paths: dict[int, Path] = {}
    for bag in dm.bags.values():
        paths.update(zip(bag.rows.tolist(), dm.instance_paths(bag.bag_id), strict=True))
    return [paths[r] for r in range(len(paths))]


def one_pass(dm: PatientBagDataModule) -> tuple[int, float]:
    """Crops delivered and seconds for one pass over the training loader."""
    start = time.perf_counter()
    crops = sum(int(batch.mask.sum()) for batch in dm.train_dataloader())
    return crops, time.perf_counter() - start


def stage_costs(dm: PatientBagDataModule, repeats: int) -> dict[str, float]:
    """Median microseconds per crop of each loader step on one batch of training bags."""
    dataset, rng = dm.datasets["train"], np.random.default_rng(0)
    bags = dataset.bags[: dm.batch_size]
    rows = [bag.rows[: dm.max_instances] for bag in bags]
    naive = NaiveStore(row_paths(dm), dm.crop_spec)
    crops = [dataset.store[r] for r in rows]
    to_tensor = BagToTensor(None, dm.mean, dm.std)
    samples = [  # float crops, whatever the loader's own transform
        dataclasses.replace(dataset[(i, 0)], instances=to_tensor(c, rng))
        for i, c in enumerate(crops)
    ]
    augment = BagAugment(affine=dm.affine, color_jitter=dm.color_jitter)
    per_crop = BagToTensor(train_augmentation(affine=dm.affine, color_jitter=dm.color_jitter))
    steps = {
        "naive_decode": lambda: [naive[r] for r in rows],
        "slice_cache": lambda: [dataset.store[r] for r in rows],
        "to_tensor": lambda: [to_tensor(c, rng) for c in crops],
        "bag_augment": lambda: [augment(c, rng) for c in crops],
        "albumentations": lambda: [per_crop.augment(c, rng) for c in crops],
        "collate": lambda: collate_bags(samples),
    }
    n = sum(len(r) for r in rows)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) / n * 1e6)
    return {f"{name}_us": round(statistics.median(t), 1) for name, t in times.items()}


def loader_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="64,224", help="image sizes, comma-separated")
    p.add_argument("--augment", default="none,cpu,gpu", help="of none,cpu,gpu,albumentations")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-instances", type=int, default=24)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stages", action="store_true", help="also time each loader step")


@study(
    "loader-throughput",
    "crops per second of the training loader: decoded-crop cache vs decoding every JPEG",
    loader_arguments,
)
def loader_throughput(args: argparse.Namespace) -> Iterator[Record]:
    """Both loaders are the same ``PatientBagDataModule`` training loader (same bags, same
    random subsets of ``--max-instances`` crops, same transform); only the store behind the
    rows differs: the warm memory-mapped cache, or a naive store that opens, decodes and
    resizes every JPEG with PIL on every access (as the original study's per-crop loader did).
    Passes alternate between the two; one record per (image size, augmentation) gives the
    medians and their ratio. ``--augment``: ``none``, ``cpu`` (``augment=True``, the default
    pipeline: ``BagAugment`` then normalisation, in the loader) or ``gpu`` (the loader only
    slices uint8 crops; augmentation and normalisation run later on the device and are not
    part of this figure); ``albumentations`` (opt-in, for comparison) runs the same steps as
    ``train_augmentation`` crop by crop, the default before ``BagAugment``. One torch thread
    (``--threads``) and one OpenCV thread: figures per core. ``--stages`` adds, per image size,
    one ``loader_stages`` record: the median microseconds per crop of each step of one batch
    (the first ``--batch-size`` training bags, ``--max-instances`` crops each): naive
    decoding, slicing the cache, ``BagToTensor`` alone, ``BagAugment`` alone, the
    albumentations steps alone, and ``collate_bags`` padding the float crops into one batch."""
    import cv2

    cv2.setNumThreads(1)
    for size in map(int, args.sizes.split(",")):
        for augment in args.augment.split(","):
            dm = PatientBagDataModule(
                str(args.data),
                crops=CropSettings(image_size=size, cache_dir=args.cache_dir),
                augment=Augmentation(mode=LOADER_AUGMENT[augment]),
                loader=LoaderSettings(batch_size=args.batch_size, num_workers=args.workers),
                max_instances=args.max_instances,
            )
            start = time.perf_counter()
            dm.setup("fit")  # decodes into the cache once if it is cold
            setup_s = time.perf_counter() - start
            dataset = dm.datasets["train"]
            if augment == "albumentations":
                steps = train_augmentation(affine=dm.affine, color_jitter=dm.color_jitter)
                dataset.to_tensor = BagToTensor(steps, dm.mean, dm.std)
            cached, naive = dataset.store, NaiveStore(row_paths(dm), dm.crop_spec)
            rates: dict[str, list[float]] = {"cached": [], "naive": []}
            for _ in range(args.repeats):
                for name, store in (("cached", cached), ("naive", naive)):
                    dataset.store = store
                    crops, seconds = one_pass(dm)
                    rates[name].append(crops / seconds)
            dataset.store = cached
            cached_rate = statistics.median(rates["cached"])
            naive_rate = statistics.median(rates["naive"])
            yield {
                "record": "loader_throughput",
                "image_size": size,
                "augment": augment,
                "workers": args.workers,
                "crops_per_pass": crops,
                "repeats": args.repeats,
                "cached_crops_per_s": round(cached_rate, 1),
                "naive_crops_per_s": round(naive_rate, 1),
                "ratio": round(cached_rate / naive_rate, 2),
                "setup_s": round(setup_s, 2),
            }
        if args.stages:
            yield {"record": "loader_stages", "image_size": size, **stage_costs(dm, args.repeats)}


# fit-epoch ---------------------------------------------------------------------------------


class EpochTimer(L.Callback):
    """Wall time of every training epoch and of every validation run."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []
        self._start = self._val_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.train.append(time.perf_counter() - self._start)  # validation runs after
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val.append(time.perf_counter() - self._val_start)


def epoch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=4, help="at least 2: the first is not timed")
    p.add_argument("--augment", default="cpu,gpu", help="of cpu,gpu,none")
    p.add_argument("--workers", type=int, default=2)


@study(
    "fit-epoch", "seconds per training epoch of the default CPU model", epoch_arguments, threads=0
)
def fit_epoch(args: argparse.Namespace) -> Iterator[Record]:
    """The model and data settings are the quickstart's (``examples/configs/quickstart.yaml``):
    ``GatedFusionMIL`` with a ``small_cnn`` (width 16) on 64 px crops, 8 bags of at most 24
    crops per batch, two loader workers. The first epoch (worker start, warm-up) is left out;
    one record per augmentation mode gives the median training-epoch time (validation
    excluded) and the median validation time. ``--augment``: ``cpu`` (the default
    ``BagAugment`` in the loader workers), ``gpu`` (the torch pipeline per batch after the
    transfer: on a CPU-only machine, in the main process) or ``none``. (The epoch times in
    ``benchmarks/README.md`` were measured when ``cpu`` meant albumentations per crop.)"""
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first epoch is not timed)")
    for augment in args.augment.split(","):
        dm = PatientBagDataModule(
            str(args.data),
            crops=CropSettings(image_size=64, cache_dir=args.cache_dir),
            augment=Augmentation(mode=augment),  # type: ignore[arg-type]
            loader=LoaderSettings(
                batch_size=8, num_workers=args.workers, persistent_workers=args.workers > 0
            ),
            max_instances=24,
            split=SplitSettings(val_fraction=0.25),
        )
        dm.setup("fit")  # a cold cache is built here, not inside the timed epochs
        L.seed_everything(0, verbose=False)
        model = GatedFusionMIL(
            encoder=EncoderSettings("small_cnn", out_dim=64, kwargs={"width": 16}),
            pooling=PoolingSettings("attention", hidden=64),
            optim=OptimSettings(lr=0.003),
            pos_weight=0.55,
            tabular_dim=dm.tabular_dim,
            tabular_stats=dm.tabular_stats,
        )
        timer = EpochTimer()
        quiet_trainer(
            max_epochs=args.epochs,
            num_sanity_val_steps=0,
            callbacks=[timer],
        ).fit(model, dm)
        crops = sum(min(len(dm.bags[i].rows), 24) for i in dm.split_ids["train"])
        train_s = statistics.median(timer.train[1:])
        yield {
            "record": "fit_epoch",
            "model": "GatedFusionMIL/small_cnn(width 16)",
            "image_size": 64,
            "augment": augment,
            "workers": args.workers,
            "train_patients": len(dm.split_ids["train"]),
            "crops_per_epoch": crops,
            "epochs_timed": len(timer.train) - 1,
            "train_epoch_s": round(train_s, 2),
            "train_crops_per_s": round(crops / train_s, 1),
            "val_s": round(statistics.median(timer.val[1:]), 2),
            "torch_threads": torch.get_num_threads(),
        }


# cv-cached ---------------------------------------------------------------------------------


def cached_data_args(args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    return {
        "root": str(args.data),
        "features": {
            "encoder": args.encoder,
            "weights": args.encoder_weights,
            "dihedral": args.dihedral,
        },
        "crops": {"image_size": args.image_size, "cache_dir": cache_dir},
        "loader": {"batch_size": 8},
    }


def cached_config(args: argparse.Namespace, cache_dir: str, in_dim: int) -> dict[str, Any]:
    """The ``fit`` config every fold runs: AttentionMIL on the cached features."""
    return {
        "trainer": {"max_epochs": args.epochs, "accelerator": "cpu", "logger": False},
        "model": {
            "class_path": "AttentionMIL",
            "init_args": {
                "encoder": {"name": "identity", "in_dim": in_dim},
                "attention_hidden": 64,
                "dropout": 0.1,
                "optim": {"lr": 1e-3},
            },
        },
        "data": {
            "class_path": "CachedFeatureDataModule",
            "init_args": cached_data_args(args, cache_dir),
        },
    }


def cached_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", default="small_cnn")
    p.add_argument("--encoder-weights", default=None)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--dihedral", action="store_true")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--folds", type=int, default=5)


@study(
    "cv-cached",
    "wall time of a 5-fold cross-validation of AttentionMIL on cached crop features",
    cached_arguments,
)
def cv_cached(args: argparse.Namespace) -> Iterator[Record]:
    """Three records: the decoding of the crops into the image cache, the one feature
    extraction (``CachedFeatureDataModule``: every crop through the frozen encoder, once), and
    the cross-validation itself (``cross_validate``, each fold a ``fit`` run built from the
    same config, reading the cached features). Without ``--encoder-weights`` the encoder keeps
    its seeded initial weights: the figures time the plumbing; the metrics are not a result.
    The caches go to a fresh temporary folder unless ``--cache-dir`` is given. Heads on
    features are tiny: one torch thread (the default) beats two, by far on a shared machine."""
    from lympho_mil.cli import cross_validate

    with tempfile.TemporaryDirectory(prefix="cv-cached-") as scratch:
        cache_dir = args.cache_dir or scratch
        dm = CachedFeatureDataModule(**cached_data_args(args, cache_dir))
        bags = list(dm.bags.values())
        start = time.perf_counter()
        images, _ = dm.source.build_store(bags)  # the decoded-crop cache only
        decode_s = time.perf_counter() - start
        yield {
            "record": "image_cache",
            "image_size": args.image_size,
            "crops": len(images),
            "seconds": round(decode_s, 2),
        }
        start = time.perf_counter()
        features = FeatureCache.build_or_load(
            images, dm.extractor, dm.feature_spec, cache_dir, "cpu", dm.extract_batch_size
        )
        extract_s = time.perf_counter() - start
        yield {
            "record": "feature_extraction",
            "encoder": args.encoder,
            "image_size": args.image_size,
            "views": features.views,
            "crops": len(features),
            "dim": features.dim,
            "seconds": round(extract_s, 2),
            "crops_per_s": round(len(features) * features.views / extract_s, 1),
        }
        start = time.perf_counter()
        result = cross_validate(
            cached_config(args, cache_dir, features.dim), folds=args.folds, verbose=False
        )
        cv_s = time.perf_counter() - start
        means = {
            k: v["mean"] for k, v in result.report.items() if isinstance(v, dict) and "mean" in v
        }
        yield {
            "record": "cv_cached",
            "model": "AttentionMIL(identity)",
            "encoder": args.encoder,
            "folds": args.folds,
            "epochs": args.epochs,
            "patients": int(result.oof["id"].nunique()),
            "seconds": round(cv_s, 2),
            "fold_seconds": [round(run.seconds, 2) for run in result.runs],
            "metrics_plumbing_only": args.encoder_weights is None,
            "oof_means": means,
            "torch_threads": torch.get_num_threads(),
        }


# evaluate-speed ----------------------------------------------------------------------------

EXAMPLES = HERE.parent / "examples" / "configs"


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=EXAMPLES / "dlmi.yaml", help="the model")
    p.add_argument(
        "--compare", type=Path, nargs="*", default=[], help="further models' configs (paired)"
    )
    p.add_argument("--epochs", type=int, default=5, help="of the untimed fit of each config")
    p.add_argument("--n-bootstrap", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)


@study(
    "evaluate-speed",
    "wall time of `lympho-mil evaluate` of the DLMI folder's patients on cached features",
    evaluate_arguments,
)
def evaluate_speed(args: argparse.Namespace) -> Iterator[Record]:
    """Each config is fitted first (untimed: a few epochs; its first run also fills the
    caches), then ``lympho-mil evaluate`` of every patient of ``--data`` (81 for dlmi-dev) is
    run ``--runs`` times as a user runs it, a fresh process each time (imports included),
    with ``--n-bootstrap`` resamples, the figures and the report. The checkpoints trained on
    these patients (in sample): the figures time the command; its metrics are not a result.
    The bar of issue 20: under 30 s. Caches go to ``--cache-dir``, else a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="evaluate-speed-") as scratch:
        work = Path(args.out or scratch)
        env = {**os.environ, "LYMPHO_MIL_CACHE": args.cache_dir or str(work / "cache")}
        env.setdefault("OMP_NUM_THREADS", str(max(args.threads, 1)))
        checkpoints = []
        for i, config in enumerate([args.config, *args.compare]):
            folder = work / f"fit{i}"
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "lympho_mil", "fit", "--config", str(config),
                 "--data.root", str(args.data), f"--trainer.max_epochs={args.epochs}",
                 "--trainer.logger=false", f"--trainer.default_root_dir={folder}",
                 f"--checkpoint.dirpath={folder / 'ckpt'}", "--trainer.enable_progress_bar=false"],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            (best,) = sorted((folder / "ckpt").glob("epoch*.ckpt"))
            checkpoints.append(best)
            yield {
                "record": "fit",
                "config": config.name,
                "epochs": args.epochs,
                "seconds": round(time.perf_counter() - start, 2),
            }
        compare = [
            {"config": str(c), "ckpt_path": str(p)}
            for c, p in zip(args.compare, checkpoints[1:], strict=True)
        ]
        times = []
        for run in range(args.runs):
            out = work / f"evaluation{run}"
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "lympho_mil", "evaluate", "--config", str(args.config),
                 "--ckpt_path", str(checkpoints[0]), "--data.root", str(args.data),
                 f"--evaluate.out={out}", f"--evaluate.n_bootstrap={args.n_bootstrap}",
                 f"--evaluate.compare={json.dumps(compare)}"],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            times.append(time.perf_counter() - start)
        report = json.loads((work / "evaluation0" / "evaluation.json").read_text())
        yield {
            "record": "evaluate",
            "models": [args.config.name, *(c.name for c in args.compare)],
            "patients": report["n_patients"] + report["n_unlabelled_left_out"],
            "n_bootstrap": args.n_bootstrap,
            "median_s": round(statistics.median(times), 2),
            "runs_s": [round(t, 2) for t in times],
            "bar_s": 30,
            "under_bar": statistics.median(times) < 30,
        }


# eval-memory -------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident set of this process so far: ``VmHWM`` on Linux (per address space, so a
    fresh process starts from its own), else ``ru_maxrss`` (which exec may carry over)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def largest_bag(args: argparse.Namespace) -> torch.Tensor:
    """float[bag_size, 3, S, S]: the crops of the largest patient, repeated to ``bag_size``."""
    dm = PatientBagDataModule(
        str(args.data),
        crops=CropSettings(image_size=args.image_size, cache_dir=args.cache_dir),
        augment=Augmentation(mode="none"),
    )
    dm.setup("validate")
    dataset = dm.datasets["val"]
    bag = max(dm.bags.values(), key=lambda b: len(b.rows))
    rows = np.resize(bag.rows, args.bag_size)
    return dm.instance_transform("val")(dataset.store[rows], np.random.default_rng(0))


def measure_memory(crops: torch.Tensor, chunk: int, device: torch.device) -> dict[str, float]:
    batch = collate_bags([BagSample(crops, torch.zeros(0), 1.0, "bag", ["x"] * len(crops))])
    model = AttentionMIL(encoder=EncoderSettings("resnet18"), chunk_size=chunk).eval().to(device)
    batch = batch.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model(batch)
        torch.cuda.synchronize(device)
        return {"peak_above_inputs_mib": (torch.cuda.max_memory_allocated(device) - before) / MIB}
    before = peak_rss_mib()
    with torch.inference_mode():
        model(batch)
    return {"peak_rss_growth_mib": peak_rss_mib() - before, "peak_rss_mib": peak_rss_mib()}


def eval_memory_child(chunk: int, bag_file: str) -> None:
    """One CPU measurement in a fresh process: its figures as the last line of stdout."""
    crops = torch.from_numpy(np.load(bag_file))
    print(json.dumps(measure_memory(crops, chunk, torch.device("cpu"))))


CHILD = (
    "import sys; sys.path.insert(0, {here!r}); import study_speed; "
    "study_speed.eval_memory_child(int(sys.argv[1]), sys.argv[2])"
)


def memory_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunks", default="8,16,32,64,200")
    p.add_argument("--bag-size", type=int, default=200)
    p.add_argument("--image-size", type=int, default=224)


@study(
    "eval-memory",
    "peak memory of evaluating a 200-crop bag at 224 px with a ResNet-18, per chunk size",
    memory_arguments,
    threads=0,
)
def eval_memory(args: argparse.Namespace) -> Iterator[Record]:
    """The bag is the largest patient of the DLMI folder, its crops repeated up to
    ``--bag-size``; ``AttentionMIL`` with a ``resnet18`` encoder and ``chunk_size=c``
    evaluates it under ``torch.inference_mode``, encoding at most ``c`` crops at once. On
    CUDA the figure is ``torch.cuda.max_memory_allocated`` above what the model and the bag
    already hold. On the CPU each chunk size runs in a fresh process and the figure is the
    growth of its peak resident set during the forward pass: allocator caching makes it an
    upper bound of what the tensors needed, but the trend with the chunk size is the point.
    One record per chunk size."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    crops = largest_bag(args)
    with tempfile.TemporaryDirectory() as scratch:
        bag_file = Path(scratch) / "bag.npy"
        np.save(bag_file, crops.numpy())
        for chunk in map(int, args.chunks.split(",")):
            if device.type == "cuda":
                figures = measure_memory(crops, chunk, device)
            else:
                code = CHILD.format(here=str(HERE))
                child = [sys.executable, "-c", code, str(chunk), str(bag_file)]
                output = subprocess.run(child, capture_output=True, text=True, check=True).stdout
                figures = json.loads(output.strip().splitlines()[-1])
            yield {
                "record": "eval_memory",
                "device": str(device),
                "model": "AttentionMIL/resnet18",
                "bag_size": args.bag_size,
                "image_size": args.image_size,
                "chunk_size": chunk,
                **{k: round(v, 1) for k, v in figures.items()},
            }


# gpu-throughput ----------------------------------------------------------------------------


class StepTimer(L.Callback):
    """Crops and seconds of the training steps after ``warmup`` (device synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.crops: torch.Tensor | int = 0
        self.start = self.seconds = 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step > self.warmup:
            self.crops = self.crops + batch.mask.sum()  # stays on the device: no sync per step

    def on_train_end(self, trainer, module) -> None:  # type: ignore[no-untyped-def]
        self._sync(module)
        self.seconds = time.perf_counter() - self.start


class Replayed(Dataset):
    """Batches already on the device (a loader over it with ``batch_size=None`` yields them as
    they are)."""

    def __init__(self, batches: list[BagBatch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> BagBatch:
        return self.batches[index]


def crops_per_second(
    model: L.LightningModule,
    data: PatientBagDataModule | DataLoader,
    args: argparse.Namespace,
    precision: str,
) -> float:
    timer = StepTimer(args.warmup)
    trainer = quiet_trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    if isinstance(data, DataLoader):
        trainer.fit(model, train_dataloaders=data)
    else:
        trainer.fit(model, datamodule=data)
    return int(timer.crops) / timer.seconds


def loader_crops_per_second(loader: DataLoader, batches: int) -> float:
    """Real crops per second of ``batches`` batches of ``loader`` (epochs chained), after one
    warm-up epoch that starts the workers."""
    sum(1 for _ in loader)
    crops, start = 0, time.perf_counter()
    while batches > 0:
        for batch in loader:
            crops += int(batch.mask.sum())
            batches -= 1
            if batches == 0:
                break
    return crops / (time.perf_counter() - start)


def device_side_ms(dm: PatientBagDataModule, raw: BagBatch, repeats: int = 20) -> Record:
    """Median milliseconds of the device-side work on one raw training batch: the gather of
    ``cache_on_device``, and the augmentation of the pixels as shipped (channels last) and
    made contiguous first."""
    device = raw.instances.device

    def timed(step) -> float:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 2)

    figures, pixels = {}, raw.instances
    if pixels.dtype == torch.int64:
        figures["gather_ms"] = timed(lambda: dm.device_pixels(device)[raw.instances])
        pixels = dm.device_pixels(device)[raw.instances]
    chw = pixels.permute(0, 1, 4, 2, 3)
    generator = torch.Generator(device).manual_seed(0)
    figures["augment_channels_last_ms"] = timed(
        lambda: dm.device_augment(chw, raw.mask, True, generator)
    )
    figures["augment_contiguous_ms"] = timed(
        lambda: dm.device_augment(chw.contiguous(), raw.mask, True, generator)
    )
    figures["crops"] = int(raw.mask.sum())
    return figures


def gpu_model(args: argparse.Namespace) -> AttentionMIL:
    L.seed_everything(0, verbose=False)
    encoder = EncoderSettings(
        "resnet18",
        channels_last=True,
        compile=args.compile,
        shape_multiple=args.shape_multiple or None,
    )
    return AttentionMIL(encoder=encoder, optim=OptimSettings(scheduler="none"))


def gpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-instances", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--augment", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--cache-on-device", action="store_true", help="crops kept on the GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--shape-multiple", type=int, default=16, help="0: one shape per crop count")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test the study on a CPU")


@study(
    "gpu-throughput",
    "training crops per second on CUDA: the real pipeline against the in-memory bound",
    gpu_arguments,
    threads=0,
)
def gpu_throughput(args: argparse.Namespace) -> Iterator[Record]:
    """A ResNet-18 ``AttentionMIL`` (channels-last) trains on 224 px crops, 8 bags of 32 crops
    per step, fed (a) by the real pipeline: ``PatientBagDataModule`` over the warm decoded-crop
    cache, ``--workers`` loader processes, pinned memory, non-blocking copies, uint8 transfer
    and batch augmentation on the device (``--augment gpu``), and (b) by the loader's own
    batches of one epoch, normalised once and kept on the device, replayed in the same order
    every epoch (the same crop counts as the pipeline, and the same epoch ends): the upper
    bound. One ``gpu_throughput`` record per precision (``bf16-mixed`` = AMP on, ``32-true`` =
    off) with both rates and their ratio; one ``loader_alone`` record: the crops per second of
    the training loader iterated with nothing else running (pinned batches, no copy to the
    device), which the pipeline cannot exceed; with ``--augment gpu`` one ``device_side``
    record (gather and augmentation times of one batch). ``--cache-on-device``
    (``PatientBagDataModule(cache_on_device=True)``, with ``--augment gpu``): the decoded
    crops are copied to the GPU once, the loader ships row numbers and the device gathers the
    pixels. Every new number of real crops in a step costs cuDNN new plans for each layer, and
    bag sizes vary: the model tops each encoder call up to a multiple of ``--shape-multiple``
    crops (16 by default; 0 turns it off), so a few shapes recur, and the 150 warm-up steps see
    them all. Without CUDA it yields one ``skipped`` record; ``--allow-cpu`` runs the same code
    on the CPU as a smoke test of the study (its figures mean nothing)."""
    if not torch.cuda.is_available() and not args.allow_cpu:
        yield {"record": "skipped", "reason": "no CUDA device"}
        return
    args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    dm = PatientBagDataModule(
        str(args.data),
        crops=CropSettings(image_size=args.image_size, cache_dir=args.cache_dir),
        augment=Augmentation(
            mode="gpu" if args.augment == "gpu" else "cpu", cache_on_device=args.cache_on_device
        ),
        loader=LoaderSettings(
            batch_size=args.batch_size,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0,
        ),
        max_instances=args.max_instances,
    )
    dm.setup("fit")  # warm the decoded-crop cache before timing
    loader = dm.train_dataloader()
    yield {
        "record": "loader_alone",
        "device": str(device),
        "image_size": args.image_size,
        "augment": args.augment,
        "cache_on_device": args.cache_on_device,
        "workers": args.workers,
        "batches_per_epoch": len(loader),
        "crops_per_s": round(loader_crops_per_second(loader, args.warmup + args.steps), 1),
    }
    raw = [batch.to(device) for batch in loader]
    if args.augment == "gpu":  # the device augmentation's own time
        yield {"record": "device_side", "device": str(device), **device_side_ms(dm, raw[0])}
    # normalised, as training would see them
    on_device = [dm.on_after_batch_transfer(batch, 0) for batch in raw]
    del raw
    in_memory = DataLoader(Replayed(on_device), batch_size=None)
    del loader  # its workers stop
    for precision in ("bf16-mixed", "32-true"):
        real = crops_per_second(gpu_model(args), dm, args, precision)
        upper = crops_per_second(gpu_model(args), in_memory, args, precision)
        yield {
            "record": "gpu_throughput",
            "device": str(device),
            "model": "AttentionMIL/resnet18 channels_last" + (" compiled" if args.compile else ""),
            "precision": precision,
            "image_size": args.image_size,
            "crops_per_step": args.batch_size * args.max_instances,
            "augment": args.augment,
            "cache_on_device": args.cache_on_device,
            "workers": args.workers,
            "shape_multiple": args.shape_multiple,
            "steps_timed": args.steps,
            "pipeline_crops_per_s": round(real, 1),
            "in_memory_crops_per_s": round(upper, 1),
            "ratio": round(real / upper, 3),
        }
