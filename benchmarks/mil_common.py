"""What the MIL benchmark scripts share: the models by short name, one fit, the machine."""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
from speed_common import quiet_trainer

from lympho_mil.data.datamodule import BagDataModule
from lympho_mil.models import (
    AttentionMIL,
    BagClassifier,
    GatedAttentionMIL,
    MaxPoolMIL,
    MeanPoolMIL,
)

T = TypeVar("T")

MODELS: dict[str, type[BagClassifier]] = {
    "attention": AttentionMIL,
    "gated": GatedAttentionMIL,
    "mean": MeanPoolMIL,
    "max": MaxPoolMIL,
}


def quiet(threads: int) -> None:
    """Silence Lightning's per-fit chatter; ``threads`` torch threads."""
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def fit_predict(
    make_model: Callable[[], BagClassifier], data: BagDataModule, epochs: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train for ``epochs`` fixed epochs (no validation, no checkpoint) on the datamodule's
    training bags; return ``(labels, probabilities)`` of its ``predict_ids`` bags."""
    L.seed_everything(seed, workers=True, verbose=False)
    model = make_model()
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    records = [r for batch in trainer.predict(model, data) for r in batch]
    labels = np.array([r["label"] for r in records])
    return labels, np.array([r["probability"] for r in records])


class Timed:
    """``fn`` returning ``(result, CPU seconds it took)`` (picklable for worker processes)."""

    def __init__(self, fn: Callable[[T], Any]) -> None:
        self.fn = fn

    def __call__(self, task: T) -> tuple[Any, float]:
        start = time.process_time()
        result = self.fn(task)
        return result, time.process_time() - start


def run_tasks(
    fn: Callable[[T], Any], tasks: Sequence[T], jobs: int, threads: int
) -> Iterator[tuple[Any, float]]:
    """``(fn(t), CPU seconds)`` for each task, in order, from ``jobs`` worker processes of
    ``threads`` torch threads each."""
    if jobs == 1:
        yield from map(Timed(fn), tasks)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=quiet, initargs=(threads,)) as pool:
        yield from pool.map(Timed(fn), tasks)


def machine() -> str:
    """Where the figures come from (the load average matters on a shared machine)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, "
        f"{torch.get_num_threads()} torch thread(s), load avg {load} at start"
    )
