"""MNIST-bags (Ilse et al., 2018): test AUC against the number of training bags.

    python benchmarks/mnist_bags.py --data ../shared/data/mnist
        [--train-bags 50 100 150 200 300 400 500] [--runs 5] [--first-seed 0]
        [--model attention gated ...]

A bag is positive when it holds a 9; bag lengths ~ Normal(mean 10, variance 2). Run ``r``
(seed ``first_seed + r``) draws its training bags from the first 5,000 images and its 1,000
test bags from the last 5,000: every training-set size of a run meets the same test bags. Each
fit is the library's model (LeNet encoder) on :class:`MNISTBagsDataModule` (pixels normalised
with the usual MNIST mean and standard deviation) with the Lightning Trainer, for a fixed
budget of optimiser steps (no validation). The budget of 2,500 steps and the normalisation
were chosen on validation bags drawn from the training images, but that search began after
the test bags of seeds 0-4 had been scored; ``--first-seed 100`` gives test bags no choice
saw (``benchmarks/README.md``). Prints one JSON line per (model, training-set size) with the
mean and standard deviation of the AUC over runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from mil_common import MODELS, fit_predict, machine, quiet, run_tasks
from sklearn.metrics import roc_auc_score

from lympho_mil.data.bag_sources import MNISTBagsDataModule
from lympho_mil.models import BagClassifier


def epochs_for(n_bags: int, batch_size: int, steps: int, min_epochs: int) -> int:
    """Epochs giving about ``steps`` optimiser steps (at least ``min_epochs``)."""
    return max(min_epochs, math.ceil(steps / math.ceil(n_bags / batch_size)))


def make_model(args: argparse.Namespace, model_name: str) -> BagClassifier:
    return MODELS[model_name](
        encoder="lenet",
        embed_dim=500,
        attention_hidden=128,
        lr=args.lr,
        weight_decay=args.weight_decay,
    )


def fit_run(args: argparse.Namespace, model_name: str, task: tuple[int, int]) -> float:
    """Test AUC of one run (bag draw and seed ``run``) with ``n_bags`` training bags."""
    n_bags, run = task
    data = MNISTBagsDataModule(
        str(args.data),
        n_train_bags=n_bags,
        n_test_bags=args.test_bags,
        bag_seed=run,
        normalize=args.normalize,
        batch_size=args.batch_size,
    )
    epochs = epochs_for(n_bags, args.batch_size, args.steps, args.min_epochs)
    y, prob = fit_predict(partial(make_model, args, model_name), data, epochs, seed=run)
    return float(roc_auc_score(y, prob))


def learning_curve(args: argparse.Namespace, model_name: str) -> Iterator[dict[str, object]]:
    """One result per training-set size, as soon as its runs are done."""
    runs = range(args.first_seed, args.first_seed + args.runs)
    tasks = [(n_bags, run) for n_bags in args.train_bags for run in runs]
    fit = partial(fit_run, args, model_name)
    aucs: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    results = run_tasks(fit, tasks, args.jobs, args.threads)
    for (n_bags, _), (auc, fit_cpu) in zip(tasks, results, strict=True):
        aucs.append(auc)
        cpu.append(fit_cpu)
        if len(aucs) < args.runs:
            continue
        yield {
            "dataset": "mnist_bags",
            "model": model_name,
            "train_bags": n_bags,
            "test_bags": args.test_bags,
            "auc_mean": round(float(np.mean(aucs)), 4),
            "auc_std": round(float(np.std(aucs, ddof=1)), 4) if len(aucs) > 1 else None,
            "auc_per_run": [round(a, 4) for a in aucs],
            "runs": args.runs,
            "first_seed": args.first_seed,
            "epochs": epochs_for(n_bags, args.batch_size, args.steps, args.min_epochs),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "normalize": args.normalize,
            "jobs": args.jobs,
            "seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds_per_fit": round(float(np.median(cpu)), 1),
        }
        aucs, cpu, start = [], [], time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files")
    parser.add_argument(
        "--train-bags", type=int, nargs="+", default=[50, 100, 150, 200, 300, 400, 500]
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seed of the first run's bags and fit"
    )
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["attention"])
    parser.add_argument("--test-bags", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2500, help="optimiser steps per fit")
    parser.add_argument("--min-epochs", type=int, default=5)
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pixels shifted and scaled by the MNIST mean and standard deviation",
    )
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--jobs", type=int, default=1, help="fits run in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    quiet(args.threads)
    where = machine()
    for name in args.model:
        for result in learning_curve(args, name):
            print(json.dumps(result | {"machine": where}), flush=True)


if __name__ == "__main__":
    main()
