"""Peak memory of evaluating one 200-crop bag at 224 px with a ResNet-18, per chunk size.

    python benchmarks/eval_memory.py [--data DLMI_FOLDER] [--chunks 8,16,32,64,200]

The bag is the largest patient of the DLMI folder, its crops repeated up to ``--bag-size``;
``AttentionMIL(encoder="resnet18", chunk_size=c)`` evaluates it under
``torch.inference_mode``, encoding at most ``c`` crops at once. On CUDA the figure is
``torch.cuda.max_memory_allocated`` above what the model and the bag already hold. On the CPU
each chunk size runs in a fresh process and the figure is the growth of its peak resident
set (``ru_maxrss``) during the forward pass: allocator caching makes it an upper bound of
what the tensors needed, but the trend with the chunk size is the point. One JSON line per
chunk size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from speed_common import emit, parser

from lympho_mil.data import BagSample, PatientBagDataModule, collate_bags
from lympho_mil.models import AttentionMIL

MIB = 2**20


def peak_rss_mib() -> float:
    """Peak resident set of this process so far: ``VmHWM`` on Linux (per address space, so a
    fresh process starts from its own), else ``ru_maxrss`` (which exec may carry over)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def largest_bag(args) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """float[bag_size, 3, S, S]: the crops of the largest patient, repeated to ``bag_size``."""
    dm = PatientBagDataModule(
        str(args.data), image_size=args.image_size, cache_dir=args.cache_dir, augment=False
    )
    dm.setup("validate")
    dataset = dm.datasets["val"]
    bag = max(dm.bags.values(), key=lambda b: len(b.rows))
    rows = np.resize(bag.rows, args.bag_size)
    return dm.instance_transform("val")(dataset.store[rows], np.random.default_rng(0))


def measure(crops: torch.Tensor, chunk: int, device: torch.device) -> dict[str, float]:
    batch = collate_bags([BagSample(crops, torch.zeros(0), 1.0, "bag", ["x"] * len(crops))])
    model = AttentionMIL(encoder="resnet18", chunk_size=chunk).eval().to(device)
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


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--chunks", default="8,16,32,64,200")
    p.add_argument("--bag-size", type=int, default=200)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.child is not None:  # one CPU measurement in this fresh process: CHUNK BAG_FILE
        crops = torch.from_numpy(np.load(args.child[1]))
        print(json.dumps(measure(crops, int(args.child[0]), device)))
        return
    crops = largest_bag(args)
    with tempfile.TemporaryDirectory() as scratch:
        bag_file = Path(scratch) / "bag.npy"
        np.save(bag_file, crops.numpy())
        for chunk in map(int, args.chunks.split(",")):
            if device.type == "cuda":
                figures = measure(crops, chunk, device)
            else:
                child = [sys.executable, __file__, "--child", str(chunk), str(bag_file)]
                output = subprocess.run(child, capture_output=True, text=True, check=True).stdout
                figures = json.loads(output.strip().splitlines()[-1])
            emit(
                "eval_memory",
                device,
                model="AttentionMIL/resnet18",
                bag_size=args.bag_size,
                image_size=args.image_size,
                chunk_size=chunk,
                **{k: round(v, 1) for k, v in figures.items()},
            )


if __name__ == "__main__":
    main()
