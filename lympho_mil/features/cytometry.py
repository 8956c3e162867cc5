"""Cytomorphometry of the centred cell of each crop, with scikit-image.

`cytometry_features` turns one RGB crop (uint8 ``[S, S, 3]``, May-Grünwald Giemsa) into
``len(CYTOMETRY_FEATURES)`` label-free numbers, what a haematologist reads off a lymphocyte:
the size and shape of its nucleus (``regionprops``), how much cytoplasm surrounds it, the
colour of nucleus and cytoplasm as stain densities relative to the crop's own background (so
that slides lit or stained a little differently compare), and the texture of the chromatin
(grey-level co-occurrence, ``graycoprops``; local binary patterns). scikit-image does the
measuring; what is written here is only the segmentation rule and the choice of measures.

The nucleus is the haematoxylin channel of ``rgb2hed`` above its Otsu threshold, opened
(2 px disc), the connected region under the crop centre (or nearest to it), holes filled.
The cytoplasm is the ring of 8 px around the nucleus, its bright background pixels left out;
the cell is the nucleus with the bluish (``B > R``), non-background pixels connected to it,
within 24 px. Lengths are fractions of the crop side, so crops must be taken at one scale
(the recipe: 112 px centre crops at full resolution). A crop where no nucleus is found gives
zeros and ``nucleus_found = 0``.

`CytometryEncoder` wraps it as a frozen encoder of ``x[M, 3, H, W]`` (normalised as the
loaders normalise) for the feature cache; it runs on the CPU, about 5 ms a crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

CYTOMETRY_VERSION = 1  # bump when a feature changes: cached features are then recomputed
GLCM_DISTANCES = (1, 3)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
LBP_BINS = 10  # uniform patterns of 8 neighbours at radius 1, plus the non-uniform bin
RING = 8  # px: the cytoplasm ring
CELL_REACH = 24  # px: how far from the nucleus the cell may extend
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CYTOMETRY_FEATURES: tuple[str, ...] = (
    "nucleus_found",
    # nucleus shape (regionprops; lengths as fractions of the crop side)
    "nucleus_diameter",  # equivalent circular diameter
    "nucleus_major_axis",
    "nucleus_minor_axis",
    "nucleus_eccentricity",
    "nucleus_solidity",
    "nucleus_extent",
    "nucleus_form_factor",  # 4 pi area / perimeter^2 (1 for a disc; lower when lobed)
    "nucleus_offset",  # centroid's distance from the crop centre
    # the cell around it
    "cell_diameter",
    "cell_solidity",
    "nucleus_cell_area_ratio",  # N/C: nucleus area / cell area
    "cytoplasm_ring_share",  # non-background share of the ring around the nucleus
    # stain densities, -log10(I / background) per channel, and the rgb2hed stains
    *(f"nucleus_od_{c}" for c in "rgb"),
    *(f"cytoplasm_od_{c}" for c in "rgb"),
    "nucleus_hematoxylin",
    "nucleus_eosin",
    "cytoplasm_hematoxylin",
    "cytoplasm_eosin",
    "cytoplasm_blue_excess",  # mean (B - R) / background: basophilic cytoplasm is blue
    "cytoplasm_od_std",
    "cytoplasm_granules",  # share of ring pixels much denser than the ring (granules)
    # chromatin: density quantiles, co-occurrence texture, local binary patterns
    "nucleus_od_std",
    "nucleus_od_q10",
    "nucleus_od_q50",
    "nucleus_od_q90",
    *(f"glcm_{p.lower()}_d{d}" for d in GLCM_DISTANCES for p in GLCM_PROPS),
    *(f"lbp_{i}" for i in range(LBP_BINS)),
    # context
    "other_nuclear_share",  # haematoxylin-rich pixels outside the nucleus
    "background_share",
)
"""Names of the `cytometry_features`, in output order."""


def cytometry_features(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` uint8 ``[S, S, 3]`` -> float32 ``[len(CYTOMETRY_FEATURES)]``."""
    from scipy import ndimage as ndi
    from skimage import measure, morphology
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    out = dict.fromkeys(CYTOMETRY_FEATURES, 0.0)
    side = float(min(rgb.shape[:2]))
    pixels = rgb.astype(np.float32)
    grey = pixels.mean(axis=2)
    background = grey > np.quantile(grey, 0.9) - 12  # the bright plasma between the cells
    bg_colour = np.median(pixels[background], axis=0) if background.any() else pixels.max((0, 1))
    od = -np.log10(np.clip(pixels + 1, 1, None) / (bg_colour + 1))
    hed = rgb2hed(rgb)
    stain = hed[..., 0]
    nuclear = stain > threshold_otsu(stain) if np.ptp(stain) > 0 else np.zeros_like(background)
    nucleus = _central_region(ndi.binary_opening(nuclear, morphology.disk(2)))
    out["background_share"] = float(background.mean())
    if nucleus is None:
        return np.array(list(out.values()), dtype=np.float32)
    nucleus = ndi.binary_fill_holes(nucleus)
    props = measure.regionprops(nucleus.astype(np.uint8))[0]
    centre = (np.array(rgb.shape[:2]) - 1) / 2
    out.update(
        nucleus_found=1.0,
        nucleus_diameter=props.equivalent_diameter_area / side,
        nucleus_major_axis=props.axis_major_length / side,
        nucleus_minor_axis=props.axis_minor_length / side,
        nucleus_eccentricity=props.eccentricity,
        nucleus_solidity=props.solidity,
        nucleus_extent=props.extent,
        nucleus_form_factor=min(4 * math.pi * props.area / max(props.perimeter, 1.0) ** 2, 1.5),
        nucleus_offset=float(np.hypot(*(np.array(props.centroid) - centre))) / side,
        other_nuclear_share=float((nuclear & ~nucleus).mean()),
    )
    distance = ndi.distance_transform_edt(~nucleus)  # px from the nucleus
    near = (distance <= RING) & ~nucleus
    ring = near & ~background
    out["cytoplasm_ring_share"] = float(ring.sum() / max(near.sum(), 1))
    bluish = (pixels[..., 2] > pixels[..., 0]) & ~background & (distance <= CELL_REACH)
    cell = _connected_to(bluish | nucleus, nucleus)
    cell = ndi.binary_fill_holes(cell)
    cell_props = measure.regionprops(cell.astype(np.uint8))[0]
    out.update(
        cell_diameter=cell_props.equivalent_diameter_area / side,
        cell_solidity=cell_props.solidity,
        nucleus_cell_area_ratio=props.area / max(cell_props.area, 1),
    )
    for name, mask in (("nucleus", nucleus), ("cytoplasm", ring)):
        if not mask.any():
            continue
        for i, c in enumerate("rgb"):
            out[f"{name}_od_{c}"] = float(od[..., i][mask].mean())
        out[f"{name}_hematoxylin"] = float(hed[..., 0][mask].mean())
        out[f"{name}_eosin"] = float(hed[..., 1][mask].mean())
    density = od.mean(axis=2)
    if ring.any():
        ring_density = density[ring]
        out["cytoplasm_blue_excess"] = float(
            ((pixels[..., 2] - pixels[..., 0])[ring] / (bg_colour.mean() + 1)).mean()
        )
        out["cytoplasm_od_std"] = float(ring_density.std())
        out["cytoplasm_granules"] = float(
            (ring_density > ring_density.mean() + 2 * ring_density.std()).mean()
        )
    chromatin = density[nucleus]
    q10, q50, q90 = np.quantile(chromatin, (0.1, 0.5, 0.9))
    out.update(nucleus_od_std=float(chromatin.std()), nucleus_od_q10=q10)
    out.update(nucleus_od_q50=q50, nucleus_od_q90=q90)
    out.update(_texture(density, nucleus))
    return np.array([float(v) for v in out.values()], dtype=np.float32)


def _central_region(mask: np.ndarray) -> np.ndarray | None:
    """The connected region of ``mask`` under the crop centre, else the one whose centroid is
    nearest to it; None if ``mask`` is empty."""
    from skimage import measure

    labels = measure.label(mask)
    if labels.max() == 0:
        return None
    cy, cx = (s // 2 for s in mask.shape)
    label = labels[cy, cx]
    if label == 0:
        regions = measure.regionprops(labels)
        label = min(regions, key=lambda r: (r.centroid[0] - cy) ** 2 + (r.centroid[1] - cx) ** 2)
        label = label.label
    return labels == label


def _connected_to(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The regions of ``mask`` that touch ``seed``."""
    from skimage import measure

    labels = measure.label(mask)
    keep = np.unique(labels[seed])
    return np.isin(labels, keep[keep > 0])


def _texture(density: np.ndarray, nucleus: np.ndarray) -> dict[str, float]:
    """Co-occurrence and local-binary-pattern texture of ``density`` inside ``nucleus``.

    The nucleus's densities are quantised to 16 levels between its own 1st and 99th
    percentiles (levels 1-16; 0 outside the nucleus, dropped from the co-occurrence counts),
    so the texture describes the pattern of the chromatin, apart from its overall density.
    """
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    values = density[nucleus]
    low, high = np.quantile(values, (0.01, 0.99))
    scaled = np.clip((density - low) / max(high - low, 1e-6), 0, 1)
    levels = np.where(nucleus, 1 + np.minimum((scaled * 16).astype(np.int64), 15), 0)
    angles = (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    counts = graycomatrix(
        levels.astype(np.uint8), GLCM_DISTANCES, angles, levels=17, symmetric=True
    )[1:, 1:].astype(np.float64)
    totals = counts.sum(axis=(0, 1), keepdims=True)
    counts = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    out: dict[str, float] = {}
    for p in GLCM_PROPS:
        per_distance = graycoprops(counts, p).mean(axis=1)  # [distances], mean over angles
        for d, v in zip(GLCM_DISTANCES, per_distance, strict=True):
            out[f"glcm_{p.lower()}_d{d}"] = float(np.nan_to_num(v))
    grey8 = (scaled * 255).astype(np.uint8)
    lbp = local_binary_pattern(grey8, 8, 1, method="uniform")[nucleus]
    hist = np.bincount(lbp.astype(np.int64), minlength=LBP_BINS)[:LBP_BINS]
    for i, share in enumerate(hist / max(hist.sum(), 1)):
        out[f"lbp_{i}"] = float(share)
    return out


class CytometryEncoder(nn.Module):
    """`cytometry_features` of every crop as a frozen encoder for the feature cache.

    ``x[M, 3, H, W]`` normalised with ``mean``/``std`` -> ``float32[M, D]`` (on ``x``'s
    device; computed on the CPU with scikit-image). Nothing is learned.
    """

    version: Tensor
    mean: Tensor
    std: Tensor

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        # Buffers, not plain attributes: the feature cache's key hashes the state dict.
        self.register_buffer("version", torch.tensor(CYTOMETRY_VERSION))
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))
        self.out_dim = len(CYTOMETRY_FEATURES)

    def forward(self, x: Tensor) -> Tensor:
        """``x[M, 3, H, W]`` (normalised) -> ``float32[M, D]``."""
        rgb = (x.float() * self.std + self.mean).clamp(0, 1).mul(255).round()
        crops = rgb.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        rows = [cytometry_features(crop) for crop in crops]
        return torch.from_numpy(np.stack(rows)).to(x.device)
