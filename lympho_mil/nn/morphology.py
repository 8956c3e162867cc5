"""Hand-crafted, label-free morphology of the centred cell of each crop, in pure torch.

`MorphologyEncoder` maps crops ``x[M, 3, H, W]`` (normalised as the loaders normalise
them) to ``D = len(MORPHOLOGY_FEATURES)`` numbers per crop: the shape, colour and chromatin
texture of the nucleus of the centred lymphocyte, the colour of rings around it (cytoplasm,
neighbours) and a little context (other nuclei, red cells, background). Nothing is learned:
as a frozen encoder of `CachedFeatureDataModule` it is computed
once per crop, and heads (pooling, fusion with the clinical vector) learn on top of it.

How the nucleus is found: a pixel is *nuclear* when it is dark and blue-violet (May-Grunwald
Giemsa), ``B - G > blue_excess`` and ``G < max_green`` (RGB in [0, 1]); the nucleus is
the connected nuclear region that touches the centre of the crop (morphological
reconstruction from a central seed), pinholes and thin cracks closed (a 5 px closing; a pale
spot wider than about 3 px stays open). Its size features are fractions of the crop side, so
crops must be taken at one scale (the recipe: 112 px centre crops at full resolution). A crop
with no nuclear pixel at its centre gives 0 for the nucleus sizes; its eccentricity (1) and
offset (that of pixel (0, 0)) are then placeholders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RING_WIDTHS = (4, 8, 12)
MORPHOLOGY_VERSION = 1  # bump when a feature changes: cached features are then recomputed

MORPHOLOGY_FEATURES: tuple[str, ...] = (
    # nucleus shape (lengths as fractions of the crop side)
    "nucleus_diameter",  # sqrt(4 area / pi)
    "nucleus_major_axis",
    "nucleus_minor_axis",
    "nucleus_eccentricity",
    # 4 pi area / (boundary pixels)^2, the boundary being the nucleus pixels with a background
    # 8-neighbour inside the crop: a digital measure (a disc about 0.65, higher for a nucleus
    # cut by the crop edge, whose edge pixels are not counted), not the Euclidean ratio
    "nucleus_circularity",
    "nucleus_solidity",  # area / area of its morphological closing
    "nucleus_offset",  # distance of the centroid from the crop centre
    # nucleus colour and chromatin texture (RGB in [0, 1])
    "nucleus_red",
    "nucleus_green",
    "nucleus_blue",
    "nucleus_grey_std",
    "nucleus_grey_q10",
    "nucleus_grey_q50",
    "nucleus_grey_q90",
    "nucleus_gradient",  # mean |finite difference| inside the nucleus
    "nucleus_laplacian",  # mean |grey - 3x3 mean| inside the nucleus
    "nucleus_coarse_std",  # std of the 7x7-smoothed grey inside the nucleus
    "nucleus_dark_fraction",  # share of pixels darker than the nucleus mean - 0.05
    # rings around the nucleus: cytoplasm, then neighbours
    *(f"ring{w}_{c}" for w in RING_WIDTHS for c in ("red", "green", "blue", "bluish")),
    # context
    "other_nuclear_fraction",  # nuclear pixels outside the nucleus
    "background_fraction",  # bright pixels
    "red_cell_fraction",  # pink pixels (red cells)
)
"""Names of the `MorphologyEncoder` features, in output order: nucleus shape (lengths as
fractions of the crop side), nucleus colour and chromatin texture, colours of three rings
around the nucleus, and context."""


def _dilate(mask: Tensor, size: int) -> Tensor:
    """Max filter of the bool ``mask[..., H, W]`` over an octagon of width ``size`` (odd): as
    many one-pixel steps as its radius, alternately 8- and 4-connected, a close stand-in for
    a disc. Pixels outside the crop count as background."""
    out = mask
    for step in range(size // 2):
        grown = out.clone()
        grown[..., 1:, :] |= out[..., :-1, :]
        grown[..., :-1, :] |= out[..., 1:, :]
        grown[..., :, 1:] |= out[..., :, :-1]
        grown[..., :, :-1] |= out[..., :, 1:]
        if step % 2 == 0:
            grown[..., 1:, 1:] |= out[..., :-1, :-1]
            grown[..., :-1, :-1] |= out[..., 1:, 1:]
            grown[..., 1:, :-1] |= out[..., :-1, 1:]
            grown[..., :-1, 1:] |= out[..., 1:, :-1]
        out = grown
    return out


def _erode(mask: Tensor, size: int) -> Tensor:
    """Min filter of the bool ``mask`` over the octagon of `_dilate`; pixels outside the
    crop count as foreground."""
    return ~_dilate(~mask, size)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``values[M, C, H, W]`` averaged over the bool ``mask[M, 1, H, W]`` -> ``[M, C]`` (0 where
    the mask is empty)."""
    weight = mask.to(values.dtype)
    return (values * weight).sum((2, 3)) / weight.sum((2, 3)).clamp(min=1.0)


def _masked_std(values: Tensor, mask: Tensor) -> Tensor:
    mean = _masked_mean(values, mask)[..., None, None]
    return _masked_mean((values - mean) ** 2, mask).sqrt()


def _masked_quantiles(values: Tensor, mask: Tensor, q: Sequence[float]) -> Tensor:
    """Quantiles of ``values[M, 1, H, W]`` over ``mask`` -> ``[M, len(q)]`` (0 if empty)."""
    flat = values.flatten(1).masked_fill(~mask.flatten(1), float("nan"))
    out = torch.nanquantile(
        flat, torch.tensor(q, dtype=values.dtype, device=values.device), dim=1
    ).T
    return out.nan_to_num(0.0)


def reconstruct(mask: Tensor, seed: Tensor, max_iter: int = 256) -> Tensor:
    """Morphological reconstruction of the bool ``mask[..., H, W]`` from the bool ``seed``:
    the pixels of ``mask`` 8-connected to ``seed`` inside ``mask``."""
    region = seed & mask
    for _ in range(max_iter):
        grown = _dilate(region, 3) & mask
        if torch.equal(grown, region):
            break
        region = grown
    return region


class MorphologyEncoder(nn.Module):
    """Fixed morphology features of the centred cell: ``x[M, 3, H, W]`` -> ``[M, D]``.

    ``D = len(MORPHOLOGY_FEATURES)``, in that order (how the nucleus is found:
    `lympho_mil.nn.morphology`). The input is un-normalised
    with ``mean``/``std`` (those of the loaders; ImageNet's by default;
    `lympho_mil.features.CachedFeatureDataModule` passes its own), so pixels are back in [0, 1]
    before the colour thresholds (a pixel exactly on a threshold, e.g. ``B - G = 51/255``,
    falls on the side that the normalisation's float rounding gives). No parameters; any
    float input dtype; float32 out.

    Args:
        mean, std: per-channel normalisation the input carries.
        blue_excess, max_green: a pixel is nuclear when ``B - G > blue_excess`` and
            ``G < max_green``.
        seed_fraction: side of the central seed square, as a fraction of the crop side.
    """

    version: Tensor
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        blue_excess: float = 0.2,
        max_green: float = 0.47,
        seed_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        # Buffers, not plain attributes: the feature cache's key hashes the state dict.
        self.register_buffer("version", torch.tensor(MORPHOLOGY_VERSION))
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))
        self.blue_excess = blue_excess
        self.max_green = max_green
        self.seed_fraction = seed_fraction
        self.out_dim = len(MORPHOLOGY_FEATURES)

    def nucleus_mask(self, rgb: Tensor) -> tuple[Tensor, Tensor]:
        """``rgb[M, 3, H, W]`` in [0, 1] -> bool ``[M, 1, H, W]`` masks of the nucleus of the
        centred cell and of every nuclear pixel."""
        green, blue = rgb[:, 1:2], rgb[:, 2:3]
        nuclear = (blue - green > self.blue_excess) & (green < self.max_green)
        h, w = rgb.shape[-2:]
        half = max(1, round(self.seed_fraction * min(h, w) / 2))
        seed = torch.zeros_like(nuclear)
        seed[..., h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half] = True
        nucleus = reconstruct(nuclear, seed)
        closed = _erode(_dilate(nucleus, 5), 5) & _dilate(nucleus, 3)  # pinholes, thin cracks
        return nucleus | closed, nuclear

    def forward(self, x: Tensor) -> Tensor:
        """``x[M, 3, H, W]`` (normalised) -> ``float32[M, D]``."""
        rgb = (x.float() * self.std.float() + self.mean.float()).clamp(0.0, 1.0)
        side = float(min(rgb.shape[-2:]))
        nucleus, nuclear = self.nucleus_mask(rgb)
        grey = rgb.mean(dim=1, keepdim=True)
        shape = self._shape(nucleus) / torch.tensor(
            [side] * 3 + [1.0] * 3 + [side], device=x.device
        )
        inner = _erode(nucleus, 3)
        dy = F.pad((grey[..., 1:, :] - grey[..., :-1, :]).abs(), (0, 0, 0, 1))
        dx = F.pad((grey[..., :, 1:] - grey[..., :, :-1]).abs(), (0, 1, 0, 0))
        local = F.avg_pool2d(grey, 3, 1, 1, count_include_pad=False)
        smooth = F.avg_pool2d(grey, 7, 1, 3, count_include_pad=False)
        grey_mean = _masked_mean(grey, nucleus)[..., None, None]
        texture = torch.cat(
            [
                _masked_mean(rgb, nucleus),
                _masked_std(grey, nucleus),
                _masked_quantiles(grey, nucleus, (0.1, 0.5, 0.9)),
                _masked_mean(dx + dy, inner),
                _masked_mean((grey - local).abs(), inner),
                _masked_std(smooth, inner),
                _masked_mean((grey < grey_mean - 0.05).float(), nucleus),
            ],
            dim=1,
        )
        red, blue = rgb[:, 0:1], rgb[:, 2:3]
        bluish = (blue > red).float()
        rings, inside = [], nucleus
        for width in RING_WIDTHS:
            outside = _dilate(inside, 2 * width + 1)
            ring = outside & ~inside
            rings += [_masked_mean(rgb, ring), _masked_mean(bluish, ring)]
            inside = outside
        background = grey > 0.85
        red_cells = ~nuclear & ~background & (red > blue)
        context = torch.cat(
            [
                (nuclear & ~nucleus).float().mean((2, 3)),
                background.float().mean((2, 3)),
                red_cells.float().mean((2, 3)),
            ],
            dim=1,
        )
        return torch.cat([shape, texture, *rings, context], dim=1)

    @staticmethod
    def _shape(nucleus: Tensor) -> Tensor:
        """Diameter, major and minor axes (px), eccentricity, circularity, solidity, offset (px)
        of the bool ``nucleus[M, 1, H, W]`` -> ``[M, 7]``."""
        h, w = nucleus.shape[-2:]
        mask = nucleus[:, 0].float()
        area = mask.sum((1, 2))
        safe = area.clamp(min=1.0)
        ys = torch.arange(h, dtype=mask.dtype, device=mask.device).view(1, h, 1)
        xs = torch.arange(w, dtype=mask.dtype, device=mask.device).view(1, 1, w)
        cy = (ys * mask).sum((1, 2)) / safe
        cx = (xs * mask).sum((1, 2)) / safe
        dy, dx = ys - cy.view(-1, 1, 1), xs - cx.view(-1, 1, 1)
        syy = (dy * dy * mask).sum((1, 2)) / safe
        sxx = (dx * dx * mask).sum((1, 2)) / safe
        sxy = (dx * dy * mask).sum((1, 2)) / safe
        half_trace = (sxx + syy) / 2
        spread = (half_trace**2 - (sxx * syy - sxy**2)).clamp(min=0.0).sqrt()
        major, minor = half_trace + spread, (half_trace - spread).clamp(min=0.0)
        eccentricity = (1.0 - minor / major.clamp(min=1e-6)).clamp(min=0.0).sqrt()
        perimeter = (nucleus & ~_erode(nucleus, 3)).sum((1, 2, 3)).float()
        circularity = 4 * math.pi * area / perimeter.clamp(min=1.0) ** 2
        closed = _erode(_dilate(nucleus, 15), 15).sum((1, 2, 3)).float()
        solidity = area / closed.clamp(min=1.0)
        offset = ((cy - (h - 1) / 2) ** 2 + (cx - (w - 1) / 2) ** 2).sqrt()
        return torch.stack(
            [
                (4 * area / math.pi).sqrt(),
                4 * major.sqrt(),
                4 * minor.sqrt(),
                eccentricity,
                circularity,
                solidity,
                offset,
            ],
            dim=1,
        )
