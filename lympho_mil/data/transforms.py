"""Per-crop augmentation (albumentations) and conversion of a bag to a float tensor."""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

import albumentations as A
import numpy as np
import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_augmentation(
    flips: bool = True,
    rotate90: bool = True,
    affine: float = 0.5,
    color_jitter: float = 0.5,
    jitter_strength: float = 0.1,
) -> A.Compose:
    """Training pipeline on uint8 HWC crops: flips, 90-degree rotations, mild affine, colour.

    ``affine`` and ``color_jitter`` are the probabilities of those steps (0 disables them).
    Cells have no canonical orientation, so flips and right-angle rotations are free.
    """
    steps: list[A.BasicTransform] = []
    if flips:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if rotate90:
        steps.append(A.RandomRotate90(p=1.0))
    if affine > 0:
        steps.append(
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.05, 0.05),
                rotate=(-15, 15),
                border_mode=0,
                fill=0,
                p=affine,
            )
        )
    if color_jitter > 0:
        s = jitter_strength
        steps.append(
            A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=s / 5, p=color_jitter)
        )
    return A.Compose(steps)


class BagToTensor:
    """uint8[n, H, W, 3] crops -> float32[n, 3, H, W], augmented per crop, then normalised.

    Normalisation is vectorised over the whole bag; ``augment`` (an albumentations pipeline,
    or None for evaluation) runs crop by crop on the decoded pixels.
    """

    def __init__(
        self,
        augment: A.BasicTransform | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        self.augment = augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, crops: np.ndarray, rng: np.random.Generator) -> Tensor:
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(2**31 - 1)))
            crops = np.stack([self.augment(image=c)["image"] for c in crops])
        x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
        return (x / 255.0 - self.mean) / self.std


class FeaturesToTensor:
    """float[n, D] precomputed features -> float32[n, D] (optionally with Gaussian noise)."""

    def __init__(self, noise_std: float = 0.0) -> None:
        self.noise_std = noise_std

    def __call__(self, features: np.ndarray, rng: np.random.Generator) -> Tensor:
        x = np.asarray(features, dtype=np.float32)
        if self.noise_std > 0:
            x = x + self.noise_std * rng.standard_normal(x.shape, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x))
