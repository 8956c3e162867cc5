"""Training crops per second on CUDA: the real pipeline against one in-memory batch.

    python benchmarks/gpu_throughput.py [--data DLMI_FOLDER] [--steps 60] [--warmup 15]
        [--augment gpu|cpu] [--workers N] [--compile]

A ResNet-18 ``AttentionMIL`` (channels-last) trains on 224 px crops, 8 bags of 32 crops per
step, fed (a) by the real pipeline: ``PatientBagDataModule`` over the warm decoded-crop cache,
``--workers`` loader processes, pinned memory, non-blocking copies, uint8 transfer and batch
augmentation on the device (``--augment gpu``), and (b) by one batch already on the device,
repeated: the upper bound. One JSON line per precision (``bf16-mixed`` = AMP on,
``32-true`` = off) with both rates and their ratio. Without CUDA it prints
``{"skipped": "no CUDA device"}``; ``--allow-cpu`` runs the same code on the CPU as a smoke
test of the script (its figures mean nothing).
"""

from __future__ import annotations

import json
import os
import time

import lightning as L
import torch
from speed_common import emit, parser, quiet
from torch.utils.data import DataLoader, Dataset

from lympho_mil.data import BagBatch, PatientBagDataModule
from lympho_mil.models import AttentionMIL


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


class Repeated(Dataset):
    """One batch, ``n`` times (a loader over it with ``batch_size=None`` yields it as is)."""

    def __init__(self, batch: BagBatch, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> BagBatch:
        return self.batch


def crops_per_second(
    model: L.LightningModule, data: PatientBagDataModule | DataLoader, args, precision: str
) -> float:  # type: ignore[no-untyped-def]
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    if isinstance(data, DataLoader):
        trainer.fit(model, train_dataloaders=data)
    else:
        trainer.fit(model, datamodule=data)
    return int(timer.crops) / timer.seconds


def make_model(args) -> AttentionMIL:  # type: ignore[no-untyped-def]
    L.seed_everything(0, verbose=False)
    return AttentionMIL(
        encoder="resnet18", channels_last=True, compile_encoder=args.compile, scheduler="none"
    )


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-instances", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--augment", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test the script on a CPU")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(json.dumps({"name": "gpu_throughput", "skipped": "no CUDA device"}))
        return
    quiet()
    args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    dm = PatientBagDataModule(
        str(args.data),
        image_size=args.image_size,
        cache_dir=args.cache_dir,
        augment="gpu" if args.augment == "gpu" else True,
        batch_size=args.batch_size,
        max_instances=args.max_instances,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    dm.setup("fit")  # warm the decoded-crop cache before timing
    first = next(iter(dm.train_dataloader())).to(device)
    on_device = dm.on_after_batch_transfer(first, 0)  # normalised, as training would see it
    in_memory = DataLoader(Repeated(on_device, args.warmup + args.steps + 1), batch_size=None)
    for precision in ("bf16-mixed", "32-true"):
        real = crops_per_second(make_model(args), dm, args, precision)
        upper = crops_per_second(make_model(args), in_memory, args, precision)
        emit(
            "gpu_throughput",
            device,
            model="AttentionMIL/resnet18 channels_last" + (" compiled" if args.compile else ""),
            precision=precision,
            image_size=args.image_size,
            crops_per_step=args.batch_size * args.max_instances,
            augment=args.augment,
            workers=args.workers,
            steps_timed=args.steps,
            pipeline_crops_per_s=round(real, 1),
            in_memory_crops_per_s=round(upper, 1),
            ratio=round(real / upper, 3),
        )


if __name__ == "__main__":
    main()
