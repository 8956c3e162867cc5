"""Stain jitter: the colour of another smear, drawn in the optical densities of its stains.

Smears stained on another day, or by another hand, differ in how much of each stain the
cells took up; a crop's colours then tell its smear apart before its cell (the twenty-fourth
round of docs/results.md: colour statistics alone find a crop's patient 36 % of the time).
`StainJitter` redraws those amounts, as Tellez et al. (Medical Image Analysis 2019) do for
histology: the pixels become optical densities, unmixed into haematoxylin, eosin and residual
with scikit-image's stain matrix (`skimage.color.hed_from_rgb`, Ruifrok and Johnston), each
stain's density is scaled by a factor drawn in ``[1 - strength, 1 + strength]`` and shifted by
an amount in ``[-SHIFT, SHIFT]``, and the densities are mixed back. Relative colours within a
crop (a blue cytoplasm beside pink red cells) survive; the smear's overall stain does not.

Written here because the field libraries miss it: `skimage.color.rgb2hed` clips negative
densities (its round trip moves pixels by up to 26 grey levels on these crops), and
albumentations' ``HEStain`` mixes two stains back without the residual, turning the beige
background of these smears pink even at no jitter. With three stains and no clipping, a
strength of 0 returns the crop unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

from lympho_mil.data.transforms import albumentations

albumentations()  # its first import, without the online update check
from albumentations import ImageOnlyTransform  # noqa: E402

SHIFT = 0.05
"""The largest additive change of a stain's optical density (densities of these crops run
from 0 to about 2)."""

_UNMIX = hed_from_rgb.astype(np.float32)
_MIX = rgb_from_hed.astype(np.float32)


def jitter_stains(image: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``image`` (uint8 ``[H, W, 3]``, RGB) with each stain's optical density (haematoxylin,
    eosin, residual) multiplied by ``scale[i]`` and increased by ``shift[i]`` (``[3]`` each)."""
    density = -np.log((image.astype(np.float32) + 1) / 256)
    stains = density @ _UNMIX
    stains = stains * scale.astype(np.float32) + shift.astype(np.float32)
    rgb = 256 * np.exp(-(stains @ _MIX)) - 1
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


class StainJitter(ImageOnlyTransform):
    """An albumentations transform: `jitter_stains` with factors in ``[1 - strength,
    1 + strength]`` and shifts in ``[-SHIFT, SHIFT]``, drawn per image from the pipeline's
    seeded generator."""

    def __init__(self, strength: float = 0.3, p: float = 1.0) -> None:
        if not 0 <= strength < 1:
            raise ValueError(f"stain jitter strength must be in [0, 1), got {strength}")
        super().__init__(p=p)
        self.strength = strength

    def get_params(self) -> dict[str, np.ndarray]:
        s = self.strength
        return {
            "scale": self.random_generator.uniform(1 - s, 1 + s, 3),
            "shift": self.random_generator.uniform(-SHIFT, SHIFT, 3),
        }

    def apply(
        self, img: np.ndarray, scale: np.ndarray, shift: np.ndarray, **params: Any
    ) -> np.ndarray:
        return jitter_stains(img, scale, shift)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("strength",)
