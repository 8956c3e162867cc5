"""Augmentation of whole batches on the training device (pure torch, vectorised per crop).

With ``PatientBagDataModule(augment="gpu")`` the training loader only slices the decoded-crop
cache and ships raw ``uint8`` pixels, channels last as cached (4x fewer bytes than float32, and
no channel split on the CPU); after the copy to the device, the channels move in front and
`DeviceAugment` augments every crop of the batch in three passes over its pixels: one
warp (a random dihedral view, composed with a mild affine for a share of the crops: one
``grid_sample``), one reduction (each crop's mean grey) and one affine colour map (jitter and
normalisation composed into a 3x4 matrix per crop, applied as a batched matrix product, clamped
once). These are the steps of the CPU pipeline (`lympho_mil.data.transforms.BagAugment`),
with the same colour maps (`colour_maps`). Padded slots stay zeros. Nothing here syncs
with the host. It runs on any device, the CPU included, but it pays on a GPU: on a CPU,
`BagAugment` in the loader is faster.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lympho_mil.dihedral import DIHEDRAL_VIEWS

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey weights, as torchvision's rgb_to_grayscale

# The 8 dihedral views as (x, y) -> (a x + b y, c x + d y) about the crop's centre. The CPU
# (BagAugment) moves pixels forward by them; the device warp samples the input at the
# matrix times the output position. The two number the views differently; both draw them
# uniformly, so the set of views is the same.
DIHEDRAL_MATRICES = (
    ((1, 0), (0, 1)),
    ((0, -1), (1, 0)),
    ((-1, 0), (0, -1)),
    ((0, 1), (-1, 0)),
    ((-1, 0), (0, 1)),
    ((1, 0), (0, -1)),
    ((0, 1), (1, 0)),
    ((0, -1), (-1, 0)),
)


def pixels_to_tensor(crops: np.ndarray, rng: np.random.Generator | None = None) -> Tensor:
    """uint8[n, H, W, 3] cached crops -> the same pixels as a tensor, channels still last (no
    copy): the loader then only slices and pads, and the device moves the channels in
    `on_after_batch_transfer`. An instance
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
    as `BagToTensor` does on the CPU."""
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    mean_t = device_constant(tuple(mean), x.device, torch.float32).view(-1, 1, 1)
    return (x - mean_t) / device_constant(tuple(std), x.device, torch.float32).view(-1, 1, 1)


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``values`` (numbers, or nested tuples of them) as a tensor on ``device``, made once per
    device: a copy from the host to a GPU waits for the device, so one per training step would
    stall the pipeline. Never an inference tensor, so autograd may use it."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype).to(device)


def colour_maps(brightness: Tensor, contrast: Tensor, saturation: Tensor) -> Tensor:
    """Per-crop factors ``[...]`` -> colour maps ``[..., 3, 4]``: ``x -> M x + t m`` on RGB
    pixels, where ``m`` is the crop's mean grey (to be multiplied into the last column).

    With grey weights ``w`` (`LUMA`): brightness ``b x``, then contrast
    ``c y + (1 - c) b m``, then saturation ``s z + (1 - s) (w . z)``; the saturation step keeps
    grey, so the offset stays grey. Factors of 1 give the identity.
    """
    luma = device_constant(LUMA, brightness.device, brightness.dtype)
    eye = torch.eye(3, dtype=brightness.dtype, device=brightness.device)
    s = saturation[..., None, None]
    linear = (brightness * contrast)[..., None, None] * (s * eye + (1 - s) * luma)
    offset = ((1 - contrast) * brightness)[..., None, None].expand(*linear.shape[:-1], 1)
    return torch.cat([linear, offset], -1)


def random_warps(
    lead: tuple[int, ...],
    dihedral: bool = True,
    affine: float = 0.5,
    scale: tuple[float, float] = (0.9, 1.1),
    translate: float = 0.05,
    degrees: float = 15.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``theta[*lead, 2, 3]`` for `warp`: per crop, a uniformly drawn dihedral view
    (identity when ``dihedral`` is False), composed with probability ``affine`` with a rotation
    of up to ``degrees``, a zoom in ``scale`` and a shift of up to ``translate`` of the side."""
    views = torch.randint(
        DIHEDRAL_VIEWS if dihedral else 1, lead, generator=generator, device=device
    )
    linear = device_constant(DIHEDRAL_MATRICES, torch.device(device), torch.float32)[views]
    draws = torch.rand((5, *lead), generator=generator, device=device)
    applied = draws[0] < affine
    angle = torch.deg2rad((draws[1] * 2 - 1) * degrees)
    zoom = scale[0] + draws[2] * (scale[1] - scale[0])
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> input coordinates
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    linear = torch.where(applied[..., None, None], rotation @ linear, linear)
    shift = (draws[3:].movedim(0, -1) * 2 - 1) * translate * 2  # grids span [-1, 1]: twice the side
    shift = shift * applied[..., None]
    return torch.cat([linear, shift[..., None]], -1)


def warp(x: Tensor, theta: Tensor) -> Tensor:
    """``x[B, N, C, H, W]`` (float) resampled by ``theta[B, N, 2, 3]`` (output to input
    coordinates, ``affine_grid``'s with ``align_corners=False``): bilinear, zeros outside. A
    dihedral ``theta`` moves pixels exactly up to float rounding (about 1e-5 of the range)."""
    flat = x.flatten(0, 1)
    grid = sampling_grid(theta.flatten(0, 1).to(flat.dtype), *flat.shape[-2:])
    warped = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.view(x.shape)


def sampling_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """``theta[M, 2, 3]`` -> ``grid[M, H, W, 2]``, as ``F.affine_grid(theta, (M, C, H, W))``
    computes it, but written in two broadcast passes (``affine_grid`` first materialises a
    ``[M, H, W, 3]`` base grid and multiplies it by ``theta``: several times the traffic)."""
    centres = [
        (torch.arange(n, device=theta.device, dtype=theta.dtype) * 2 + 1) / n - 1
        for n in (height, width)
    ]
    ys, xs = centres[0].view(1, -1, 1), centres[1].view(1, 1, -1)
    grid = torch.empty(len(theta), height, width, 2, device=theta.device, dtype=theta.dtype)
    for axis in range(2):
        row = theta[:, axis].unsqueeze(-1).unsqueeze(-1)  # [M, 3, 1, 1]
        torch.add(row[:, 0] * xs + row[:, 2], row[:, 1] * ys, out=grid[..., axis])
    return grid


@dataclass(frozen=True)
class DeviceAugment:
    """Raw crops ``uint8[B, N, C, H, W]`` -> normalised float32, augmented when training.

    Args:
        mean, std: per-channel normalisation of pixels in [0, 1] (``mean`` in [0, 1]).
        dihedral: a random flip/90-degree rotation view per crop.
        affine: probability of a random affine warp per crop (see `random_warps`).
        brightness, contrast, saturation: jitter strengths: factors in ``[1 - s, 1 + s]``.
        color_p: probability that a crop's colours are jittered (0 disables it).

    Training pixels are clamped to [0, 1] once, after the colour map. A ``generator`` passed
    to a call must live on the pixels' device.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dihedral: bool = True
    affine: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    color_p: float = 0.5

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"need 3 channel means and stds, got {self.mean}, {self.std}")
        if not all(0 <= m <= 1 for m in self.mean) or not all(s > 0 for s in self.std):
            raise ValueError(f"need mean in [0, 1] and std > 0, got {self.mean}, {self.std}")

    def __call__(
        self,
        pixels: Tensor,
        mask: Tensor,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``uint8 pixels[B, N, 3, H, W]``, ``mask[B, N]`` -> float32, zero where ``mask`` is
        False."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 5 or pixels.shape[2] != 3:
            raise ValueError(
                "DeviceAugment takes uint8 RGB crops [B, N, 3, H, W] (the loader's raw pixels), "
                f"got {pixels.dtype} {tuple(pixels.shape)}"
            )
        keep = mask.view(*mask.shape, 1, 1, 1)
        geometric = train and (self.dihedral or self.affine > 0)
        colour = train and self.color_p > 0
        if not (geometric or colour):
            return normalize_pixels(pixels, self.mean, self.std).masked_fill(~keep, 0.0)
        if geometric and pixels.shape[-1] != pixels.shape[-2]:
            raise ValueError(f"rotations need square crops, got {tuple(pixels.shape[-2:])}")
        x = pixels.float()
        if geometric:
            theta = random_warps(
                tuple(mask.shape), self.dihedral, self.affine, generator=generator, device=x.device
            )
            x = warp(x, theta)
        maps = self._colour_maps(x, mask.shape, colour, generator)  # [B, N, 3, 4] on [0, 255]
        std = device_constant(tuple(self.std), x.device, torch.float32)
        mean = device_constant(tuple(self.mean), x.device, torch.float32)
        maps = maps / std[:, None]
        maps[..., 3] -= mean / std
        maps = (maps * mask[..., None, None]).flatten(0, 1)
        y = torch.baddbmm(maps[..., 3:], maps[..., :3], x.flatten(0, 1).flatten(-2))
        low, high = -mean / std, (1 - mean) / std
        return y.view(x.shape).clamp_(low.view(-1, 1, 1), high.view(-1, 1, 1))

    def _colour_maps(
        self, x: Tensor, lead: torch.Size, jitter: bool, generator: torch.Generator | None
    ) -> Tensor:
        """``[*lead, 3, 4]`` maps from pixels in [0, 255] to jittered pixels in [0, 1], the
        mean grey already in the last column (identity / 255 without ``jitter``)."""
        if not jitter:
            return torch.eye(3, 4, device=x.device).expand(*lead, 3, 4) / 255.0
        draws = torch.rand((4, *lead), generator=generator, device=x.device)
        factors = [
            torch.where(draws[0] < self.color_p, 1 + strength * (u * 2 - 1), 1.0)
            for strength, u in zip(
                (self.brightness, self.contrast, self.saturation), draws[1:], strict=True
            )
        ]
        maps = colour_maps(*factors)
        luma = device_constant(LUMA, x.device, torch.float32)
        grey = x.mean(dim=(-2, -1)) @ luma  # [*lead], on [0, 255]
        return torch.cat([maps[..., :3], maps[..., 3:] * grey[..., None, None]], -1) / 255.0
