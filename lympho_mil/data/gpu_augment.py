"""Augmentation of whole batches on the training device (pure torch, vectorised per crop).

With ``PatientBagDataModule(augment="gpu")`` the training loader only slices the decoded-crop
cache and ships raw ``uint8`` pixels, channels last as cached (4x fewer bytes than float32, and
no channel split on the CPU); after the copy to the device, the channels move in front and
:class:`DeviceAugment` draws a random dihedral view (flips x 90-degree rotations), a mild
affine warp and a colour jitter for every crop at once, and normalises: the steps of the CPU
pipeline (:class:`lympho_mil.data.transforms.BagAugment`). Padded slots stay zeros.
Nothing here syncs with the host. It runs on any device, the CPU included, but it pays on a
GPU: on a CPU, :class:`~lympho_mil.data.transforms.BagAugment` in the loader is faster.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lympho_mil.data.transforms import LUMA

DIHEDRAL_VIEWS = 8


def dihedral(x: Tensor, view: int) -> Tensor:
    """View ``view`` (0-7) of ``x[..., H, W]``: ``view % 4`` quarter turns, then a left-right
    flip when ``view >= 4``. View 0 is ``x`` itself."""
    if not 0 <= view < DIHEDRAL_VIEWS:
        raise ValueError(f"view must be in 0..7, got {view}")
    x = torch.rot90(x, view % 4, dims=(-2, -1))
    return x.flip(-1) if view >= 4 else x


def dihedral_views(x: Tensor) -> Tensor:
    """``x[M, C, H, W]`` -> its 8 dihedral views ``[M, 8, C, H, W]`` (view 0 first)."""
    return torch.stack([dihedral(x, v) for v in range(DIHEDRAL_VIEWS)], dim=1)


def pixels_to_tensor(crops: np.ndarray, rng: np.random.Generator | None = None) -> Tensor:
    """uint8[n, H, W, 3] cached crops -> the same pixels as a tensor, channels still last (no
    copy): the loader then only slices and pads, and the device moves the channels in
    :meth:`~lympho_mil.data.PatientBagDataModule.on_after_batch_transfer`. An instance
    transform that draws nothing."""
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected RGB crops [n, H, W, 3], got {crops.shape}")
    return torch.from_numpy(np.ascontiguousarray(crops))


def rows_to_tensor(rows: np.ndarray, rng: np.random.Generator | None = None) -> Tensor:
    """int64[n] row numbers -> a tensor (``cache_on_device``: the device gathers the pixels).
    An instance transform that draws nothing."""
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))


def normalize_pixels(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or [0, 1] float ``pixels[..., C, H, W]`` -> float32 ``(x - mean) / std``, computed
    as :class:`~lympho_mil.data.transforms.BagToTensor` does on the CPU."""
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    mean_t = channel_constant(tuple(mean), x.device, torch.float32)
    return (x - mean_t) / channel_constant(tuple(std), x.device, torch.float32)


@functools.lru_cache(maxsize=64)
def channel_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``values`` as a ``[C, 1, 1]`` tensor on ``device``, made once per device: a copy from
    the host to a GPU waits for the device, so one per training step would stall the
    pipeline. Never an inference tensor, so autograd may use it."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype).view(-1, 1, 1).to(device)


def random_dihedral(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly drawn dihedral view of every crop of ``x[B, N, C, S, S]`` (square crops).

    Each view is a composition of an optional transpose, an optional up-down flip and an
    optional left-right flip (three independent fair coins per crop), selected with
    ``torch.where``: an exact permutation of each crop's pixels, any dtype.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations need square crops, got {tuple(x.shape[-2:])}")
    coins = torch.rand((3, *x.shape[:2], 1, 1, 1), generator=generator, device=x.device) < 0.5
    x = torch.where(coins[0], x.transpose(-1, -2), x)
    x = torch.where(coins[1], x.flip(-2), x)
    return torch.where(coins[2], x.flip(-1), x)


def random_affine(
    x: Tensor,
    p: float = 0.5,
    scale: tuple[float, float] = (0.9, 1.1),
    translate: float = 0.05,
    degrees: float = 15.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """With probability ``p`` per crop, warp ``x[B, N, C, H, W]`` (float) by a random rotation
    (``+-degrees``), scale and translation (``+-translate`` of the side), bilinear, zeros
    outside, as the CPU pipeline's ``Affine``. Other crops are returned exactly."""
    lead = (*x.shape[:2],)
    draws = torch.rand((5, *lead), generator=generator, device=x.device)
    applied = draws[0] < p
    angle = torch.deg2rad((draws[1] * 2 - 1) * degrees)
    zoom = scale[0] + draws[2] * (scale[1] - scale[0])
    shift = (draws[3:] * 2 - 1) * translate * 2  # affine_grid spans [-1, 1]: twice the side
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> input coordinates
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[0]], -1), torch.stack([sin, cos, shift[1]], -1)], -2
    ).flatten(0, 1)
    flat = x.flatten(0, 1)
    grid = F.affine_grid(theta.to(flat.dtype), list(flat.shape), align_corners=False)
    warped = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.where(applied.view(*lead, 1, 1, 1), warped.view_as(x), x)


def color_jitter(
    x: Tensor,
    brightness: float = 0.1,
    contrast: float = 0.1,
    saturation: float = 0.1,
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-crop brightness, contrast and saturation jitter of ``x[B, N, 3, H, W]`` in [0, 1].

    Each strength ``s`` draws a factor in ``[1 - s, 1 + s]`` per crop (0 disables the step);
    with probability ``1 - p`` a crop keeps factors of 1. The blends are torchvision's:
    brightness scales, contrast blends with the crop's mean grey, saturation with each
    pixel's grey; values are clamped to [0, 1] after each step.
    """
    lead = (*x.shape[:2], 1, 1, 1)
    applied = torch.rand(lead, generator=generator, device=x.device) < p

    def factor(strength: float) -> Tensor:
        u = torch.rand(lead, generator=generator, device=x.device) * 2 - 1
        return torch.where(applied, 1 + strength * u, torch.ones_like(u))

    luma = channel_constant(tuple(LUMA.tolist()), x.device, x.dtype)
    if brightness > 0:
        x = (x * factor(brightness)).clamp(0, 1)
    if contrast > 0:
        grey = (x * luma).sum(dim=-3, keepdim=True).mean(dim=(-2, -1), keepdim=True)
        x = torch.lerp(grey, x, factor(contrast)).clamp(0, 1)
    if saturation > 0:
        grey = (x * luma).sum(dim=-3, keepdim=True)
        x = torch.lerp(grey, x, factor(saturation)).clamp(0, 1)
    return x


@dataclass(frozen=True)
class DeviceAugment:
    """Raw crops ``uint8[B, N, C, H, W]`` -> normalised float32, augmented when training.

    Args:
        mean, std: per-channel normalisation of pixels in [0, 1].
        dihedral: a random flip/90-degree rotation view per crop (see :func:`random_dihedral`).
        affine: probability of a random affine warp per crop (see :func:`random_affine`).
        brightness, contrast, saturation: jitter strengths (see :func:`color_jitter`).
        color_p: probability that a crop's colours are jittered (0 disables it).

    A ``generator`` passed to a call must live on the pixels' device.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dihedral: bool = True
    affine: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    color_p: float = 0.5

    def __call__(
        self,
        pixels: Tensor,
        mask: Tensor,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``pixels[B, N, C, H, W]``, ``mask[B, N]`` -> float32, zero where ``mask`` is False."""
        x = pixels
        if train and self.dihedral:
            x = random_dihedral(x, generator)
        if train and (self.affine > 0 or self.color_p > 0):
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        if train and self.affine > 0:
            x = random_affine(x, self.affine, generator=generator)
        if train and self.color_p > 0:
            x = color_jitter(
                x,
                self.brightness,
                self.contrast,
                self.saturation,
                self.color_p,
                generator,
            )
        x = normalize_pixels(x, self.mean, self.std)
        return x.masked_fill(~mask.view(*mask.shape, 1, 1, 1), 0.0)
