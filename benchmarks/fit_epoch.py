"""Seconds per training epoch of the default CPU model on a DLMI folder.

    python benchmarks/fit_epoch.py [--data DLMI_FOLDER] [--epochs 4] [--augment cpu,gpu]

The model and data settings are the quickstart's (``examples/configs/quickstart.yaml``):
``GatedFusionMIL`` with a ``small_cnn`` (width 16) on 64 px crops, 8 bags of at most 24 crops
per batch, two loader workers. The first epoch (worker start, warm-up) is left out; one JSON
line per augmentation mode gives the median training-epoch time (validation excluded) and the
median validation time. ``--augment``: ``cpu`` (the default ``BagAugment`` in the loader
workers), ``gpu`` (the torch pipeline per batch after the transfer: on a CPU-only machine, in
the main process) or ``none``. (The epoch times in ``benchmarks/README.md`` were measured
when ``cpu`` meant albumentations per crop, before ``BagAugment``.)
"""

from __future__ import annotations

import statistics
import time

import lightning as L
import torch
from speed_common import emit, parser, quiet, quiet_trainer

from lympho_mil.data import PatientBagDataModule
from lympho_mil.models import GatedFusionMIL

AUGMENT = {"cpu": True, "gpu": "gpu", "none": False}


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


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4, help="at least 2: the first is not timed")
    p.add_argument("--augment", default="cpu,gpu", help="of cpu,gpu,none")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first epoch is not timed)")
    quiet()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for augment in args.augment.split(","):
        dm = PatientBagDataModule(
            str(args.data),
            image_size=64,
            cache_dir=args.cache_dir,
            augment=AUGMENT[augment],
            batch_size=8,
            max_instances=24,
            val_fraction=0.25,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        dm.setup("fit")  # a cold cache is built here, not inside the timed epochs
        L.seed_everything(0, verbose=False)
        model = GatedFusionMIL(
            encoder="small_cnn",
            encoder_kwargs={"width": 16},
            embed_dim=64,
            attention_hidden=64,
            lr=0.003,
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
        emit(
            "fit_epoch",
            model="GatedFusionMIL/small_cnn(width 16)",
            image_size=64,
            augment=augment,
            workers=args.workers,
            train_patients=len(dm.split_ids["train"]),
            crops_per_epoch=crops,
            epochs_timed=len(timer.train) - 1,
            train_epoch_s=round(train_s, 2),
            train_crops_per_s=round(crops / train_s, 1),
            val_s=round(statistics.median(timer.val[1:]), 2),
            torch_threads=torch.get_num_threads(),
        )


if __name__ == "__main__":
    main()
