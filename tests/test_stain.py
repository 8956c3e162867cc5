"""Stain jitter: the optical densities of the stains redrawn, and the pretraining views that
use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_features import BACKGROUND, cell_crop

from lympho_mil.arguments import SettingError
from lympho_mil.data.stain import SHIFT, StainJitter, jitter_stains
from lympho_mil.data.transforms import albumentations
from lympho_mil.features import pretrain

A = albumentations()


def test_no_jitter_returns_the_crop_exactly() -> None:
    rng = np.random.default_rng(0)
    for image in (cell_crop(12, 24), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)):
        same = jitter_stains(image, np.ones(3), np.zeros(3))
        assert same.dtype == np.uint8 and same.shape == image.shape
        np.testing.assert_array_equal(same, image)


def test_more_haematoxylin_darkens_the_nucleus_and_spares_the_plasma() -> None:
    crop = cell_crop(12, 24, noise=0)
    darker = jitter_stains(crop, np.array([1.3, 1.0, 1.0]), np.zeros(3))
    centre, corner = (56, 56), (2, 2)
    assert tuple(crop[corner]) == BACKGROUND
    change = darker.astype(int) - crop
    assert change[centre].sum() < -30  # the chromatin: much haematoxylin, darker
    assert np.abs(change[corner]).sum() < np.abs(change[centre]).sum() / 4  # pale: little
    lighter = jitter_stains(crop, np.ones(3), np.full(3, -SHIFT))  # less of every stain
    assert (lighter.astype(int) >= crop).all()


def test_stain_jitter_draws_from_the_pipelines_seed() -> None:
    crop = cell_crop(12, 24)

    def views(seed: int) -> list[np.ndarray]:
        pipeline = A.Compose([StainJitter(0.3)], seed=seed)
        return [pipeline(image=crop)["image"] for _ in range(3)]

    first, again, other = views(0), views(0), views(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], first[1])  # each view draws anew
    assert all(np.abs(v.astype(int) - crop).max() > 5 for v in first)
    with pytest.raises(ValueError, match="strength"):
        StainJitter(1.5)


def test_stain_jitter_keys_another_encoder_and_is_checked() -> None:
    def key(settings: pretrain.PretrainSettings) -> str:
        return pretrain.encoder_cache_file(
            ["a" * 24], settings, (0.5,) * 3, (0.25,) * 3, Path()
        ).name

    plain = pretrain.PretrainSettings(stain_jitter=0.0)
    assert "stain_jitter" not in plain.described()  # so the cached SimCLR keys did not move
    assert key(pretrain.PretrainSettings(stain_jitter=0.3)) != key(plain)
    assert key(pretrain.PretrainSettings()) == key(pretrain.PretrainSettings(stain_jitter=0.3))
    with pytest.raises(SettingError, match="stain_jitter must be in"):
        pretrain.PretrainSettings(stain_jitter=1.0)


def test_pretraining_views_jitter_stains_only_when_told() -> None:
    def names(strength: float) -> list[str]:
        return [type(t).__name__ for t in pretrain.pretraining_views(0, strength).transforms]

    assert "StainJitter" not in names(0.0)
    assert names(0.3).index("StainJitter") == names(0.3).index("ColorJitter") - 1
    crop = cell_crop(12, 24)
    plain, stained = (pretrain.pretraining_views(0, s)(image=crop)["image"] for s in (0.0, 0.3))
    assert plain.shape == stained.shape == crop.shape and not np.array_equal(plain, stained)
