"""Bag transforms on cached uint8 crops: random augmentation, then a normalised float tensor.

`BagAugment` (the default training augmentation) draws every random choice of a bag at
once and applies it with at most two OpenCV calls per crop: one geometric (a dihedral view, or
a warp composing that view with a mild affine) and one colour map. `BagToTensor` then
converts the whole bag to ``float32[n, 3, H, W]`` in one channel split and two vectorised
passes. An albumentations pipeline (`train_augmentation`, or your own) still plugs into
`BagToTensor`; it runs crop by crop, several times slower.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lympho_mil.arguments import SettingError
from lympho_mil.data.gpu_augment import DIHEDRAL_MATRICES, LUMA, colour_maps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BagAugmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
"""uint8[n, H, W, 3] crops -> augmented uint8[n, H, W, 3]; all randomness from the generator."""

_DIHEDRAL = np.array(DIHEDRAL_MATRICES, dtype=np.float64)
_LUMA = np.array(LUMA)

if TYPE_CHECKING:
    import albumentations as A


def albumentations() -> ModuleType:
    """The albumentations module, imported on first use (it takes about a second and would
    check online for updates: ``NO_ALBUMENTATIONS_UPDATE`` is set for that import only when
    the user has not set it)."""
    if "NO_ALBUMENTATIONS_UPDATE" in os.environ:
        import albumentations as A

        return A
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    try:
        import albumentations as A
    finally:
        del os.environ["NO_ALBUMENTATIONS_UPDATE"]
    return A


def train_augmentation(
    flips: bool = True,
    rotate90: bool = True,
    affine: float = 0.5,
    color_jitter: float = 0.5,
    jitter_strength: float = 0.1,
) -> A.Compose:
    """The default steps as an albumentations pipeline on uint8 HWC crops (with hue jitter),
    a starting point for custom pipelines: pass it, or your own, to `BagToTensor`.

    ``affine`` and ``color_jitter`` are the probabilities of those steps (0 disables them).
    """
    albu = albumentations()
    steps: list[A.BasicTransform] = []
    if flips:
        steps += [albu.HorizontalFlip(p=0.5), albu.VerticalFlip(p=0.5)]
    if rotate90:
        steps.append(albu.RandomRotate90(p=1.0))
    if affine > 0:
        steps.append(
            albu.Affine(
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
            albu.ColorJitter(brightness=s, contrast=s, saturation=s, hue=s / 5, p=color_jitter)
        )
    return albu.Compose(steps)


@dataclass(frozen=True)
class BagAugment:
    """Per-crop random augmentation of a bag ``uint8[n, S, S, 3]`` (square crops).

    Every crop gets a uniformly drawn dihedral view (flips x 90-degree rotations, exact pixel
    moves); with probability ``affine`` that view is composed with a rotation of up to
    ``degrees``, a zoom in ``scale`` and a shift of up to ``translate`` of the side (bilinear,
    black outside); with probability ``color_jitter`` its brightness, contrast and saturation
    are scaled by factors in ``[1 - jitter_strength, 1 + jitter_strength]``, composed into one
    affine colour map (contrast about the crop's mean grey, saturation about each pixel's grey)
    clipped once to [0, 255]. The steps of the device pipeline
    (`DeviceAugment`); no hue jitter.
    """

    dihedral: bool = True
    affine: float = 0.5
    color_jitter: float = 0.5
    jitter_strength: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    degrees: float = 15.0

    def __call__(self, crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        import cv2

        n: int  # an int, not Any, so that numpy's stubs type the draws below as arrays
        n, height, width, _ = crops.shape
        if (self.dihedral or self.affine > 0) and height != width:
            raise ValueError(f"rotations need square crops, got {height}x{width}")
        views = rng.integers(len(_DIHEDRAL), size=n) if self.dihedral else np.zeros(n, int)
        warp = rng.random(n) < self.affine
        warps = self._warp_matrices(views, rng.random((4, n)), width)
        jitter = rng.random(n) < self.color_jitter
        factors = 1 + self.jitter_strength * (rng.random((3, n)) * 2 - 1)
        colours = colour_maps(*torch.from_numpy(factors)).numpy()
        out = np.empty(crops.shape, crops.dtype)  # C order, whatever the input's, for OpenCV
        for i, (view, warped, jittered) in enumerate(
            zip(views.tolist(), warp.tolist(), jitter.tolist(), strict=True)
        ):
            if warped:
                cv2.warpAffine(crops[i], warps[i], (width, height), out[i], cv2.INTER_LINEAR)
            else:
                _dihedral_into(crops[i], view, out[i])
            if jittered:
                colour = colours[i].copy()
                colour[:, 3] *= float(_LUMA @ np.asarray(cv2.mean(out[i])[:3]))
                cv2.transform(out[i], colour, out[i])
        return out

    def _warp_matrices(self, views: np.ndarray, draws: np.ndarray, side: int) -> np.ndarray:
        """float[n, 2, 3]: each crop's dihedral view, then a rotation and zoom about the
        centre, then a shift; ``draws[4, n]`` uniform in [0, 1) (angle, zoom, dx, dy)."""
        angle = np.deg2rad((draws[0] * 2 - 1) * self.degrees)
        zoom = self.scale[0] + draws[1] * (self.scale[1] - self.scale[0])
        cos, sin = np.cos(angle) * zoom, np.sin(angle) * zoom
        rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
        linear = rotation @ _DIHEDRAL[views]
        centre = np.full(2, (side - 1) / 2)
        shift = (draws[2:].T * 2 - 1) * self.translate * side
        return np.concatenate([linear, (centre + shift - linear @ centre)[..., None]], -1)


def _dihedral_into(crop: np.ndarray, view: int, out: np.ndarray) -> None:
    """Write dihedral ``view`` (0-7, the rows of ``DIHEDRAL_MATRICES``) of ``crop`` into ``out``."""
    import cv2

    if view == 0:
        np.copyto(out, crop)
    elif view in (1, 3):
        cv2.rotate(
            crop, cv2.ROTATE_90_CLOCKWISE if view == 1 else cv2.ROTATE_90_COUNTERCLOCKWISE, out
        )
    elif view == 2:
        cv2.flip(crop, -1, out)
    elif view in (4, 5):
        cv2.flip(crop, 1 if view == 4 else 0, out)
    else:
        cv2.transpose(crop, out)
        if view == 7:
            cv2.flip(out, -1, out)


def _is_albumentations(augment: object) -> bool:
    """Whether ``augment`` is an albumentations transform (only possible once the user has
    imported albumentations: this never imports it)."""
    module = sys.modules.get("albumentations")
    return module is not None and isinstance(augment, module.BasicTransform | module.BaseCompose)


class PerCrop:
    """An albumentations pipeline applied crop by crop, seeded from the bag's generator."""

    def __init__(self, transform: A.BasicTransform | A.BaseCompose) -> None:
        self.transform = transform

    def __call__(self, crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        self.transform.set_random_seed(int(rng.integers(2**31 - 1)))
        return np.stack([self.transform(image=c)["image"] for c in crops])


def channel_planes(crops: np.ndarray) -> Tensor:
    """uint8[n, H, W, 3] -> uint8[3, n, H, W], one OpenCV transpose of the bag's pixels (several
    times faster than a strided copy of the HWC -> CHW permutation)."""
    import cv2

    n, height, width, channels = crops.shape
    if channels != 3:
        raise ValueError(f"expected RGB crops [n, H, W, 3], got {crops.shape}")
    pixels = np.ascontiguousarray(crops).reshape(-1, 3)
    return torch.from_numpy(cv2.transpose(pixels)).view(3, n, height, width)


class BagToTensor:
    """uint8[n, H, W, 3] crops -> float32[n, 3, H, W], augmented (optional), then normalised.

    ``augment``: a `BagAugmentation` (e.g. `BagAugment`), an albumentations
    pipeline (run crop by crop), or None (evaluation). The conversion is vectorised over the
    bag: one channel split of all its pixels, then ``x / 255`` and ``(x - mean) / std`` folded
    into one multiply-add per channel.
    """

    def __init__(
        self,
        augment: BagAugmentation | A.BasicTransform | A.BaseCompose | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        self.augment = PerCrop(augment) if _is_albumentations(augment) else augment
        std_t = torch.tensor(std, dtype=torch.float64)
        self.scale = (1 / (255 * std_t)).float().view(3, 1, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float64) / std_t).float().view(3, 1, 1, 1)

    def __call__(self, crops: np.ndarray, rng: np.random.Generator) -> Tensor:
        if self.augment is not None:
            crops = self.augment(crops, rng)
        planes = channel_planes(crops)
        n, height, width = planes.shape[1:]
        out = torch.empty((n, 3, height, width), dtype=torch.float32)
        by_channel = out.transpose(0, 1)  # [3, n, H, W], blocks of H x W contiguous
        by_channel.copy_(planes).mul_(self.scale).add_(self.shift)
        return out


@dataclass(frozen=True)
class FeatureScaling:
    """Per-feature ``clip(x, low, high)`` then ``(x - mean) / scale``; ``float32[D]`` each."""

    low: np.ndarray
    high: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> FeatureScaling:
        """Range, mean and standard deviation of ``features[n, D]`` (scale 1 where constant)."""
        x = np.asarray(features, dtype=np.float64)
        std = x.std(axis=0)
        scale = np.where(std > 1e-8, std, 1.0)
        return cls(*(v.astype(np.float32) for v in (x.min(0), x.max(0), x.mean(0), scale)))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (np.clip(features, self.low, self.high) - self.mean) / self.scale

    def to_state(self) -> dict[str, list[float]]:
        """Plain lists, for a datamodule's ``state_dict`` (saved in checkpoints)."""
        return {k: v.tolist() for k, v in asdict(self).items()}

    @classmethod
    def from_state(cls, state: dict[str, list[float]]) -> FeatureScaling:
        """The inverse of `to_state`."""
        return cls(**{k: np.asarray(v, np.float32) for k, v in state.items()})


@dataclass
class CellTypes:
    """Each crop as its cell type: the nearest of ``K`` centres, one-hot ``float32[n, K]``.

    The centres are a k-means clustering (scikit-learn) of the training patients'
    standardised crop features, fitted per split like `FeatureScaling`; averaged over a bag,
    the one-hot rows give the patient's share of every type, the form a haematologist counts
    in ("how many atypical cells"). ``centres``: ``float32[K, D]``.
    """

    centres: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, k: int, seed: int = 0) -> CellTypes:
        """K-means (``k`` clusters, 4 restarts, ``seed``) of ``features[n, D]``."""
        from sklearn.cluster import KMeans

        if len(features) < k:
            raise SettingError(
                f"cell_types is {k} but the training patients have only {len(features)} crops"
            )
        kmeans = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(features)
        return cls(kmeans.cluster_centers_.astype(np.float32))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        distances = ((features[:, None, :] - self.centres[None]) ** 2).sum(axis=-1)
        return np.eye(len(self.centres), dtype=np.float32)[distances.argmin(axis=1)]

    def to_state(self) -> dict[str, list[list[float]]]:
        """Plain lists, for a datamodule's ``state_dict`` (saved in checkpoints)."""
        return {"centres": self.centres.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, list[list[float]]]) -> CellTypes:
        """The inverse of `to_state`."""
        return cls(np.asarray(state["centres"], np.float32))


class FeaturesToTensor:
    """float[n, D] precomputed features -> float32[n, D] (optionally with Gaussian noise)."""

    def __init__(self, noise_std: float = 0.0) -> None:
        self.noise_std = noise_std

    def __call__(self, features: np.ndarray, rng: np.random.Generator) -> Tensor:
        x = np.asarray(features, dtype=np.float32)
        if self.noise_std > 0:
            x = x + self.noise_std * rng.standard_normal(x.shape, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x))
