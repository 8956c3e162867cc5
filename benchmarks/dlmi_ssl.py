"""Contrastive pretraining (SimCLR) of a small crop encoder on decoded DLMI crops, label-free.

    python benchmarks/dlmi_ssl.py (--data DLMI_FOLDER | --crops CROPS.npy) --out ENCODER.pt
        [--image-size 48] [--epochs 100]

``--data``: every crop of a DLMI folder, the 112 px centre resized to ``--image-size`` (through
the image cache); ``--crops``: any ``uint8[M, H, W, 3]`` array instead. Two random views of
every crop (rotation, scale, shift, flips, brightness, contrast, saturation) go through
``SmallCNN`` and a projection MLP; the NT-Xent loss pulls the two views of a crop together and
pushes the other crops of the batch away.
Saves the ``SmallCNN`` state dict, to load with ``CachedFeatureDataModule(encoder=
"small_cnn", encoder_weights=ENCODER.pt, encoder_kwargs=...)``. Runs on CUDA when present.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lympho_mil.data import PatientBagDataModule
from lympho_mil.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lympho_mil.nn import SmallCNN


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """``x[B, 3, H, W]`` in [0, 1] -> one random view of each crop, same shape."""
    b, device = x.shape[0], x.device

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(b, device=device, generator=generator)

    angle = uniform(0, 2 * math.pi)
    scale = uniform(0.7, 1.0)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(-0.15, 0.15)], dim=1),
            torch.stack([sin * flip, cos, uniform(-0.15, 0.15)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * uniform(0.6, 1.4)[:, None, None, None]  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * uniform(0.7, 1.3)[:, None, None, None]  # contrast
    x = x * uniform(0.8, 1.2)[:, None, None, None]  # brightness
    return x.clamp(0, 1)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR loss of two views ``z1[B, d]``, ``z2[B, d]``: each view's partner is the positive."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(logits, target)


def load_crops(args: argparse.Namespace) -> np.ndarray:
    """``uint8[M, H, W, 3]``: the ``--crops`` array, or every crop of the ``--data`` folder."""
    if args.crops is not None:
        return np.load(args.crops)
    dm = PatientBagDataModule(args.data, image_size=args.image_size, center_crop=112)
    store, _ = dm.build_store(list(dm.bags.values()))
    return np.asarray(store.array)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a DLMI folder")
    source.add_argument("--crops", help="uint8[M, H, W, 3] crops (.npy)")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--out-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    pixels = np.array(load_crops(args))  # a writable copy of the read-only cache
    crops = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    encoder = SmallCNN(width=args.width, out_dim=args.out_dim).to(device)
    projector = nn.Sequential(nn.Linear(args.out_dim, 128), nn.GELU(), nn.Linear(128, 32)).to(
        device
    )
    params = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(crops) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(crops)} crops")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(crops), device=device, generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            x = crops[order[step * args.batch_size : (step + 1) * args.batch_size]].float() / 255
            views = [(augment(x, generator) - mean) / std for _ in range(2)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                z1, z2 = (projector(encoder(v)) for v in views)
            loss = nt_xent(z1, z2, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            seconds = time.perf_counter() - start
            loss_mean = total / steps_per_epoch
            print(f"epoch {epoch}: loss {loss_mean:.3f} ({seconds:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in encoder.state_dict().items()}, args.out)


if __name__ == "__main__":
    main()
