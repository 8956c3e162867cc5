"""Wall time of a 5-fold cross-validation of AttentionMIL on cached crop features.

    python benchmarks/cv_cached.py [--data DLMI_FOLDER] [--encoder small_cnn] [--image-size 64]
        [--dihedral] [--epochs 30] [--folds 5]

Three JSON lines: the decoding of the crops into the image cache, the one feature extraction
(``CachedFeatureDataModule``: every crop through the frozen encoder, once), and the
cross-validation itself (``lympho_mil.cross_validate``, each fold a ``fit`` run
built from the same config, reading the cached features). Without ``--encoder-weights`` the
encoder keeps its seeded initial weights: the figures time the plumbing; the metrics are not
a result. The caches go to a fresh temporary folder unless ``--cache-dir`` is given. Heads on
features are tiny: one torch thread (``--threads 1``, the default) beats two, by far when the
machine is shared.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from speed_common import emit, parser, quiet

from lympho_mil import cross_validate
from lympho_mil.data import CachedFeatureDataModule, PatientBagDataModule
from lympho_mil.data.feature_cache import FeatureCache


def config(args: Any, cache_dir: str, in_dim: int) -> dict[str, Any]:
    """The ``fit`` config every fold runs: AttentionMIL on the cached features."""
    return {
        "trainer": {"max_epochs": args.epochs, "accelerator": "cpu", "logger": False},
        "model": {
            "class_path": "AttentionMIL",
            "init_args": {
                "encoder": "identity",
                "in_dim": in_dim,
                "attention_hidden": 64,
                "dropout": 0.1,
                "lr": 1e-3,
            },
        },
        "data": {"class_path": "CachedFeatureDataModule", "init_args": data_args(args, cache_dir)},
    }


def data_args(args: Any, cache_dir: str) -> dict[str, Any]:
    return {
        "root": str(args.data),
        "encoder": args.encoder,
        "encoder_weights": args.encoder_weights,
        "image_size": args.image_size,
        "dihedral": args.dihedral,
        "cache_dir": cache_dir,
        "batch_size": 8,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--encoder", default="small_cnn")
    p.add_argument("--encoder-weights", default=None)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--dihedral", action="store_true")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (see docs/performance.md)")
    args = p.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cv-cached-") as scratch:
        cache_dir = args.cache_dir or scratch
        dm = CachedFeatureDataModule(**data_args(args, cache_dir))
        bags = list(dm.bags.values())
        start = time.perf_counter()
        images, _ = PatientBagDataModule.build_store(dm, bags)  # the decoded-crop cache only
        decode_s = time.perf_counter() - start
        emit(
            "image_cache", image_size=args.image_size, crops=len(images), seconds=round(decode_s, 2)
        )
        start = time.perf_counter()
        features = FeatureCache.build_or_load(
            images, dm.extractor, dm.feature_spec, cache_dir, "cpu", dm.extract_batch_size
        )
        extract_s = time.perf_counter() - start
        emit(
            "feature_extraction",
            encoder=args.encoder,
            image_size=args.image_size,
            views=features.views,
            crops=len(features),
            dim=features.dim,
            seconds=round(extract_s, 2),
            crops_per_s=round(len(features) * features.views / extract_s, 1),
        )
        start = time.perf_counter()
        result = cross_validate(
            config(args, cache_dir, features.dim), folds=args.folds, verbose=False
        )
        cv_s = time.perf_counter() - start
        means = {
            k: v["mean"] for k, v in result.report.items() if isinstance(v, dict) and "mean" in v
        }
        emit(
            "cv_cached",
            model="AttentionMIL(identity)",
            encoder=args.encoder,
            folds=args.folds,
            epochs=args.epochs,
            patients=int(result.oof["id"].nunique()),
            seconds=round(cv_s, 2),
            fold_seconds=[round(run.seconds, 2) for run in result.runs],
            metrics_plumbing_only=args.encoder_weights is None,
            oof_means=means,
            torch_threads=torch.get_num_threads(),
        )


if __name__ == "__main__":
    main()
