"""Training crops per second on CUDA: the real pipeline against one in-memory batch.

    python benchmarks/gpu_throughput.py [--data DLMI_FOLDER] [--steps 60] [--warmup 150]
        [--augment gpu|cpu] [--cache-on-device] [--workers N] [--compile] [--shape-multiple K]

A ResNet-18 ``AttentionMIL`` (channels-last) trains on 224 px crops, 8 bags of 32 crops per
step, fed (a) by the real pipeline: ``PatientBagDataModule`` over the warm decoded-crop cache,
``--workers`` loader processes, pinned memory, non-blocking copies, uint8 transfer and batch
augmentation on the device (``--augment gpu``), and (b) by the loader's own batches of one epoch,
normalised once and kept on the device, replayed in the same order every epoch (the same crop
counts as the pipeline, and the same epoch ends: metrics, logging): the upper bound. One JSON
line per precision (``bf16-mixed`` = AMP on, ``32-true`` = off) with both rates and their
ratio, and one ``loader_alone`` line: the crops per second of the training loader iterated
with nothing else running (pinned batches, no copy to the device), which the pipeline cannot
exceed. ``--cache-on-device``
(``PatientBagDataModule(cache_on_device=True)``, with ``--augment gpu``): the decoded crops
are copied to the GPU once, the loader ships row numbers and the device gathers the pixels.
Every new number of real crops in a step costs cuDNN new plans for each layer, and bag sizes
vary: the model tops each encoder call up to a multiple of ``--shape-multiple`` crops (16 by
default; ``AttentionMIL(shape_multiple=16)``, 0 turns it off), so a few shapes recur, and the
150 warm-up steps see them all. Without it, the loader's batches (20 training patients) still
brought crop counts never seen before after 500 steps: the steady state was out of reach
(bf16 ratio 0.82-0.84 on an H200, 0.94-0.97 with it).
Without CUDA it prints ``{"skipped": "no CUDA device"}``; ``--allow-cpu`` runs the same code
on the CPU as a smoke test of the script (its figures mean nothing).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import lightning as L
import torch
from speed_common import emit, parser, quiet, quiet_trainer
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
    model: L.LightningModule, data: PatientBagDataModule | DataLoader, args, precision: str
) -> float:  # type: ignore[no-untyped-def]
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


def device_side_ms(dm: PatientBagDataModule, raw: BagBatch, repeats: int = 20) -> dict:
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


def make_model(args) -> AttentionMIL:  # type: ignore[no-untyped-def]
    L.seed_everything(0, verbose=False)
    return AttentionMIL(
        encoder="resnet18",
        channels_last=True,
        compile_encoder=args.compile,
        shape_multiple=args.shape_multiple or None,
        scheduler="none",
    )


def main() -> None:
    p = parser(__doc__.splitlines()[0])
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
        cache_on_device=args.cache_on_device,
        batch_size=args.batch_size,
        max_instances=args.max_instances,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    dm.setup("fit")  # warm the decoded-crop cache before timing
    loader = dm.train_dataloader()
    emit(
        "loader_alone",
        device,
        image_size=args.image_size,
        augment=args.augment,
        cache_on_device=args.cache_on_device,
        workers=args.workers,
        batches_per_epoch=len(loader),
        crops_per_s=round(loader_crops_per_second(loader, args.warmup + args.steps), 1),
    )
    raw = [batch.to(device) for batch in loader]
    if args.augment == "gpu":  # the device augmentation's own time
        emit("device_side", device, **device_side_ms(dm, raw[0]))
    # normalised, as training would see them
    on_device = [dm.on_after_batch_transfer(batch, 0) for batch in raw]
    del raw
    in_memory = DataLoader(Replayed(on_device), batch_size=None)
    del loader  # its workers stop
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
            cache_on_device=args.cache_on_device,
            workers=args.workers,
            shape_multiple=args.shape_multiple,
            steps_timed=args.steps,
            pipeline_crops_per_s=round(real, 1),
            in_memory_crops_per_s=round(upper, 1),
            ratio=round(real / upper, 3),
        )


if __name__ == "__main__":
    main()
