"""Bag transforms: the vectorised conversion to a normalised tensor and BagAugment's draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lympho_mil.data.gpu_augment import LUMA, colour_maps
from lympho_mil.data.transforms import BagAugment, BagToTensor, train_augmentation

GEOMETRIC = BagAugment(affine=0.0, color_jitter=0.0)


def crops(n: int = 6, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def views_of(crop: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/right-angle rotations of ``crop[H, W, C]``, computed with numpy."""
    turns = [np.rot90(crop, k) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def view_index(out: np.ndarray, crop: np.ndarray) -> int | None:
    return next((k for k, v in enumerate(views_of(crop)) if np.array_equal(v, out)), None)


def test_bag_to_tensor_normalises_every_crop() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    pixels = crops(n=3, size=7)[:, :, ::-1]  # a non-contiguous view, as a sliced store may give
    out = BagToTensor(None, mean, std)(pixels, np.random.default_rng(0))
    expected = (pixels / 255.0 - np.array(mean)) / np.array(std)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(0, 3, 1, 2).float())
    with pytest.raises(ValueError, match="RGB"):
        BagToTensor()(pixels[..., :2], np.random.default_rng(0))


def test_each_crop_gets_its_own_dihedral_view_reproducibly() -> None:
    bag = crops(n=64)
    out = GEOMETRIC(bag, np.random.default_rng(1))
    seen = [view_index(o, c) for o, c in zip(out, bag, strict=True)]
    assert None not in seen and len(set(seen)) == 8  # 64 crops: every view drawn
    assert np.array_equal(GEOMETRIC(bag, np.random.default_rng(1)), out)
    assert not np.array_equal(GEOMETRIC(bag, np.random.default_rng(2)), out)
    assert np.array_equal(BagAugment(False, 0.0, 0.0)(bag, np.random.default_rng(1)), bag)
    with pytest.raises(ValueError, match="square"):
        GEOMETRIC(bag[:, :, :5], np.random.default_rng(0))
    with pytest.raises(ValueError, match="square"):  # an affine warp alone too
        BagAugment(dihedral=False, affine=1.0)(bag[:, :, :5], np.random.default_rng(0))
    fortran = np.asfortranarray(bag)  # any memory layout: OpenCV writes into C-ordered output
    all_views = BagAugment(affine=0.5, color_jitter=0.5)
    expected = all_views(bag, np.random.default_rng(3))
    assert np.array_equal(all_views(fortran, np.random.default_rng(3)), expected)


def test_a_warp_without_distortion_is_the_same_dihedral_view() -> None:
    bag = crops(n=32)
    still = BagAugment(affine=1.0, color_jitter=0.0, scale=(1.0, 1.0), translate=0.0, degrees=0)
    rng = np.random.default_rng(3)
    assert np.array_equal(still(bag, rng), GEOMETRIC(bag, np.random.default_rng(3)))


def test_the_affine_warps_a_share_of_the_crops() -> None:
    bag = crops(n=200, size=16)
    out = BagAugment(affine=0.5, color_jitter=0.0)(bag, np.random.default_rng(0))
    warped = [view_index(o, c) is None for o, c in zip(out, bag, strict=True)]
    assert 60 < sum(warped) < 140  # about half of 200 crops
    white = np.full((50, 16, 16, 3), 255, dtype=np.uint8)
    rotated = BagAugment(affine=1.0, color_jitter=0.0, scale=(1.0, 1.0), translate=0.0)
    corners = rotated(white, np.random.default_rng(0))[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners < 255).any(axis=(1, 2)).mean() > 0.9  # corners leave the rotated crop


def test_colour_jitter_scales_each_crop_by_its_own_factor() -> None:
    grey = np.full((40, 8, 8, 3), 100, dtype=np.uint8)  # contrast and saturation keep it
    colour = BagAugment(dihedral=False, affine=0.0, color_jitter=1.0, jitter_strength=0.1)
    out = colour(grey, np.random.default_rng(0)).astype(int)
    assert (abs(out - out[:, :1, :1, :1]) <= 1).all()  # each crop stays uniform (rounding)
    levels = out[:, 0, 0, 0]
    assert levels.min() >= 90 and levels.max() <= 110 and len(set(levels.tolist())) > 10
    half = BagAugment(False, 0.0, color_jitter=0.5)(crops(n=100), np.random.default_rng(0))
    assert 20 < (half == crops(n=100)).all(axis=(1, 2, 3)).sum() < 80


def test_colour_map_is_brightness_then_contrast_then_saturation() -> None:
    pixel = np.random.default_rng(0).random((10, 3)) * 255  # [pixels, RGB] of one crop
    b, c, s = np.array([1.08]), np.array([0.93]), np.array([1.05])
    luma = np.array(LUMA)
    mean_grey = (pixel @ luma).mean()
    y = b * pixel
    z = c * y + (1 - c) * (y @ luma).mean()
    expected = s * z + (1 - s) * (z @ luma)[:, None]
    colour = colour_maps(*map(torch.from_numpy, (b, c, s)))[0].numpy()
    mapped = pixel @ colour[:, :3].T + colour[:, 3] * mean_grey
    np.testing.assert_allclose(mapped, expected)


def test_an_albumentations_pipeline_still_plugs_in() -> None:
    to_tensor = BagToTensor(train_augmentation(affine=0.0, color_jitter=0.0))
    bag = crops(n=5)
    out = to_tensor(bag, np.random.default_rng(4))
    assert out.shape == (5, 3, 8, 8)
    torch.testing.assert_close(to_tensor(bag, np.random.default_rng(4)), out)
    plain = BagToTensor()(bag, np.random.default_rng(0))
    sorted_values = [x.flatten().sort().values for x in (out, plain)]
    torch.testing.assert_close(*sorted_values)  # flips and rotations only move pixels
