"""Crop features: scikit-image cytometry, statistics pooling, cell types, SimCLR pretraining."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lympho_mil.arguments import SettingError
from lympho_mil.data import CropSettings, SplitSettings
from lympho_mil.data.transforms import CellTypes
from lympho_mil.features import (
    CachedFeatureDataModule,
    CellTypeSettings,
    FeatureSource,
    pretrain,
)
from lympho_mil.features.cytometry import (
    CYTOMETRY_FEATURES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CytometryEncoder,
    cytometry_features,
)
from lympho_mil.nn import StatisticsPooling

SIDE = 112
BACKGROUND = (245, 225, 200)  # cream plasma
NUCLEUS = (80, 30, 125)  # dark blue-violet chromatin
CYTOPLASM = (175, 180, 235)  # pale blue


def cell_crop(nucleus: float, cell: float, noise: int = 6, seed: int = 0) -> np.ndarray:
    """A synthetic May-Grünwald Giemsa crop: one round cell at the centre (radii in px)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    r = np.hypot(yy - (SIDE - 1) / 2, xx - (SIDE - 1) / 2)
    crop = np.empty((SIDE, SIDE, 3), np.float64)
    crop[:] = BACKGROUND
    crop[r <= cell] = CYTOPLASM
    crop[r <= nucleus] = NUCLEUS
    crop += rng.normal(0, noise, crop.shape)
    return np.clip(crop, 0, 255).astype(np.uint8)


def feature(values: np.ndarray, name: str) -> float:
    return float(values[CYTOMETRY_FEATURES.index(name)])


def test_cytometry_measures_the_centred_cell() -> None:
    small = cytometry_features(cell_crop(20, 26))
    large = cytometry_features(cell_crop(30, 44))
    assert small.shape == (len(CYTOMETRY_FEATURES),) and np.isfinite(small).all()
    assert feature(small, "nucleus_found") == 1.0
    assert feature(small, "nucleus_diameter") == pytest.approx(40 / SIDE, rel=0.05)
    assert feature(large, "nucleus_diameter") == pytest.approx(60 / SIDE, rel=0.05)
    assert feature(small, "nucleus_eccentricity") < 0.3  # a disc
    assert feature(small, "nucleus_cell_area_ratio") == pytest.approx((20 / 26) ** 2, abs=0.08)
    assert feature(large, "nucleus_cell_area_ratio") == pytest.approx((30 / 44) ** 2, abs=0.08)
    # the nucleus is denser than the cytoplasm, which is bluer than it is red
    assert feature(small, "nucleus_od_g") > feature(small, "cytoplasm_od_g") > 0
    assert feature(small, "cytoplasm_blue_excess") > 0


def test_cytometry_without_a_nucleus_gives_zeros_and_says_so() -> None:
    blank = np.full((SIDE, SIDE, 3), BACKGROUND, np.uint8)
    values = cytometry_features(blank)
    assert feature(values, "nucleus_found") == 0.0
    assert feature(values, "nucleus_diameter") == 0.0
    assert np.isfinite(values).all()


def test_cytometry_texture_tells_coarse_from_smooth_chromatin() -> None:
    smooth = cell_crop(28, 36, noise=2)
    coarse = smooth.copy()
    yy, xx = np.mgrid[:SIDE, :SIDE]
    clumps = ((yy // 4 + xx // 4) % 2 == 0) & (np.hypot(yy - 55.5, xx - 55.5) < 26)
    coarse[clumps] = (40, 10, 90)
    a, b = cytometry_features(smooth), cytometry_features(coarse)
    assert feature(b, "glcm_contrast_d3") > feature(a, "glcm_contrast_d3")
    assert feature(b, "nucleus_od_std") > feature(a, "nucleus_od_std")


def test_cytometry_encoder_reads_normalised_crops() -> None:
    crops = np.stack([cell_crop(20, 26), cell_crop(30, 44, seed=1)])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    encoder = CytometryEncoder()
    out = encoder((x - mean) / std)
    assert out.shape == (2, encoder.out_dim) and out.dtype == torch.float32
    expected = np.stack([cytometry_features(c) for c in crops])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_statistics_pooling_matches_numpy_and_ignores_padding() -> None:
    rng = np.random.default_rng(0)
    h = torch.from_numpy(rng.normal(size=(3, 7, 4)).astype(np.float32))
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] + [False] * 6])
    junk = h.clone()
    junk[~mask] = float("nan")
    pooling = StatisticsPooling((0.1, 0.5, 0.9))
    z, weights = pooling(junk, mask)
    assert weights is None and z.shape == (3, pooling.output_dim(4)) == (3, 20)
    for b in range(3):
        real = h[b][mask[b]].numpy()
        expected = np.concatenate(
            [real.mean(0), real.std(0), *np.quantile(real, [0.1, 0.5, 0.9], axis=0)]
        )
        np.testing.assert_allclose(z[b].numpy(), expected, rtol=1e-5, atol=1e-6)
    h.requires_grad_(True)
    pooling(h, mask)[0].sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    assert (h.grad[~mask] == 0).all()


def test_cell_types_are_one_hot_shares_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(-3, 0.3, (50, 2)), rng.normal(3, 0.3, (30, 2))])
    types = CellTypes.fit(blobs.astype(np.float32), k=2)
    onehot = types(blobs.astype(np.float32))
    assert onehot.shape == (80, 2) and set(np.unique(onehot)) == {0.0, 1.0}
    assert sorted(onehot.sum(0).tolist()) == [30.0, 50.0]
    again = CellTypes.from_state(types.to_state())
    np.testing.assert_array_equal(again(blobs.astype(np.float32)), onehot)
    with pytest.raises(SettingError, match="only 1 crops"):
        CellTypes.fit(blobs[:1].astype(np.float32), k=2)


def standardised_cytometry(cache_dir: Path) -> dict[str, Any]:
    """`CachedFeatureDataModule` settings: standardised cytometry of 32 px crops, 30 % of the
    patients for validation."""
    return dict(
        features=FeatureSource(encoder="cytometry", dtype="float32"),
        crops=CropSettings(image_size=32, cache_dir=str(cache_dir)),
        standardize=True,
        split=SplitSettings(val_fraction=0.3),
    )


def test_cached_cytometry_cell_types_are_fitted_and_saved(
    synthetic_dlmi: Path, cache_dir: Path
) -> None:
    settings = {**standardised_cytometry(cache_dir), "cell_types": 3}
    dm = CachedFeatureDataModule(str(synthetic_dlmi), **settings)
    assert dm.feature_dim == 3
    dm.setup("fit")
    sample = dm.datasets["val"][(0, 0)].instances
    assert sample.shape[1] == 3
    torch.testing.assert_close(sample.sum(dim=1), torch.ones(len(sample)))
    state = dm.state_dict()
    assert np.asarray(state["cell_types"]["centres"]).shape == (3, len(CYTOMETRY_FEATURES))
    fresh = CachedFeatureDataModule(str(synthetic_dlmi), **settings)
    fresh.load_state_dict(state)
    assert fresh.cell_types is not None
    np.testing.assert_array_equal(fresh.cell_types.centres, dm.cell_types.centres)  # type: ignore[union-attr]
    with pytest.raises(SettingError, match="cell_types"):
        CachedFeatureDataModule(
            str(synthetic_dlmi), features=FeatureSource(encoder="cytometry"), cell_types=3
        )


def test_cell_types_can_follow_the_features_they_were_drawn_from(
    synthetic_dlmi: Path, cache_dir: Path
) -> None:
    """``keep_features``: each crop is its standardised features, then its one-hot type."""
    common = standardised_cytometry(cache_dir)
    both = CachedFeatureDataModule(
        str(synthetic_dlmi), cell_types={"count": 3, "keep_features": True}, **common
    )
    alone = CachedFeatureDataModule(str(synthetic_dlmi), **common)
    d = len(CYTOMETRY_FEATURES)
    assert both.feature_dim == d + 3 and alone.feature_dim == d
    both.setup("fit")
    alone.setup("fit")
    joined = both.datasets["val"][(0, 0)].instances
    torch.testing.assert_close(joined[:, :d], alone.datasets["val"][(0, 0)].instances)
    torch.testing.assert_close(joined[:, d:].sum(dim=1), torch.ones(len(joined)))
    assert both.input_settings()["cell_types"] == {"count": 3, "keep_features": True}
    assert alone.input_settings()["cell_types"] == 0  # what earlier checkpoints recorded
    with pytest.raises(SettingError, match="keep_features needs a positive"):
        CellTypeSettings(keep_features=True)


def test_simclr_pretraining_learns_and_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lightly")
    crops = np.stack([cell_crop(8 + i % 8, 12 + i % 8, seed=i)[::4, ::4] for i in range(64)])
    settings = pretrain.PretrainSettings(
        epochs=3, batch_size=32, warmup_epochs=1, width=8, out_dim=16, hidden=32
    )
    path = pretrain.pretrained_encoder(
        [crops[:40], crops[40:]], settings, IMAGENET_MEAN, IMAGENET_STD, tmp_path
    )
    state = torch.load(path, weights_only=True)
    assert any(k.startswith("head.") for k in state)  # a SmallCNN state dict
    meta = path.with_suffix(".json").read_text()
    assert '"crops": 64' in meta and '"loss": [' in meta

    with pytest.raises(SettingError, match="batch_size"):
        pretrain.pretrain_encoder(crops[:10], settings, IMAGENET_MEAN, IMAGENET_STD)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached encoder should have been loaded")

    monkeypatch.setattr(pretrain, "pretrain_encoder", no_training)
    again = pretrain.pretrained_encoder(  # the same pixels in another order
        [crops[40:], crops[:40]], settings, IMAGENET_MEAN, IMAGENET_STD, tmp_path
    )
    assert again == path
    other = pretrain.PretrainSettings(**{**asdict(settings), "epochs": 2, "warmup_epochs": 0})
    with pytest.raises(AssertionError, match="cached encoder"):  # other settings: trained
        pretrain.pretrained_encoder([crops], other, IMAGENET_MEAN, IMAGENET_STD, tmp_path)
    changed = crops.copy()
    changed[0, 0, 0, 0] ^= 1  # one pixel
    with pytest.raises(AssertionError, match="cached encoder"):
        pretrain.pretrained_encoder([changed], settings, IMAGENET_MEAN, IMAGENET_STD, tmp_path)


def test_simclr_cache_keys_did_not_move_when_dino_came() -> None:
    """A SimCLR pretraining's key hashes its settings as before ``method`` existed (this
    file name was computed then), so encoders cached earlier are loaded, not retrained."""
    key = pretrain.encoder_cache_file(
        ["b" * 24, "a" * 24],
        pretrain.PretrainSettings(stain_jitter=0.0),  # the settings of the seventh round
        (0.5,) * 3,
        (0.25,) * 3,
        Path("c"),
    )
    assert key.name == "encoder-9b32c8403b209292c8bb1da4.pt"
    keys = {
        pretrain.encoder_cache_file(["a" * 24], settings, (0.5,) * 3, (0.25,) * 3, Path("c"))
        for settings in (pretrain.PretrainSettings(), pretrain.PretrainSettings(method="dino"))
    }
    assert len(keys) == 2  # DINO's encoder is another one
    with pytest.raises(SettingError, match="method"):
        pretrain.PretrainSettings(method="byol")


def test_patient_partners_are_other_crops_of_the_same_patient() -> None:
    patients = np.array([3, 1, 3, 1, 1, 7, 3])  # patient 7 has one crop
    partners = pretrain.PatientPartners(patients, seed=0)
    rows = np.tile(np.arange(7), 200)
    drawn = partners(rows, share=1.0)
    alone = rows == 5
    assert (drawn[alone] == 5).all()  # no other crop: its own
    assert (patients[drawn] == patients[rows]).all() and (drawn[~alone] != rows[~alone]).all()
    for row in (0, 1):  # uniform over the others of its patient
        others = np.bincount(drawn[rows == row], minlength=7)
        assert set(np.flatnonzero(others)) == set(np.flatnonzero(patients == patients[row])) - {row}
        assert others[others > 0].min() > 60
    half = partners(rows, share=0.5)
    assert 0.4 < np.mean(half[~alone] != rows[~alone]) < 0.6


def test_patient_pairs_need_patients_and_key_the_cache_by_them() -> None:
    crops = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    paired = pretrain.PretrainSettings(patient_pairs=0.5, batch_size=2)
    with pytest.raises(SettingError, match="patient of every crop"):
        pretrain.pretrain_encoder(crops, paired, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(SettingError, match="patient_pairs must be in"):
        pretrain.PretrainSettings(patient_pairs=1.5)

    def key(settings: pretrain.PretrainSettings, patients: np.ndarray) -> str:
        digests = pretrain.crops_digests([crops], settings, [patients])
        return pretrain.encoder_cache_file(digests, settings, (0.5,) * 3, (0.25,) * 3, Path()).name

    one, two = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert key(paired, one) != key(paired, two)  # other pairs, another encoder
    assert key(paired, np.array([7, 7, 2, 2])) == key(paired, one)  # the same pairs
    plain = pretrain.PretrainSettings()
    assert key(plain, one) == key(plain, two)  # without pairs, the patients do not matter
    assert "patient_pairs" not in plain.described()  # so SimCLR keys did not move


def test_patient_pairs_train_on_patients_numbered_apart_in_each_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two folders whose patients are numbered alike: the pretraining sees them as different
    patients, each crop beside its own pixels, and the loss falls."""
    pytest.importorskip("lightly")
    crops = np.stack([cell_crop(8 + i % 8, 12 + i % 8, seed=i)[::4, ::4] for i in range(64)])
    settings = pretrain.PretrainSettings(
        epochs=4, batch_size=32, warmup_epochs=1, width=8, out_dim=16, hidden=32,
        patient_pairs=0.5,
    )  # fmt: skip
    patients = [np.arange(40) % 8, np.arange(24) % 3]  # both folders have patients 0, 1, 2
    seen: dict[str, np.ndarray] = {}
    train = pretrain.pretrain_encoder

    def spy(pixels: np.ndarray, *args: object) -> tuple:
        seen["pixels"], seen["patients"] = pixels, args[-1]  # type: ignore[assignment]
        return train(pixels, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pretrain, "pretrain_encoder", spy)
    path = pretrain.pretrained_encoder(
        [crops[:40], crops[40:]], settings, IMAGENET_MEAN, IMAGENET_STD, tmp_path,
        patients=patients,
    )  # fmt: skip
    owners = seen["patients"]
    assert len(np.unique(owners)) == 8 + 3  # none shared by the two folders
    for pixels, folder in zip((crops[:40], crops[40:]), patients, strict=True):
        rows = [np.flatnonzero((seen["pixels"] == c).all(axis=(1, 2, 3)))[0] for c in pixels]
        same = folder[:, None] == folder[None, :]  # each crop keeps its own patient
        assert ((owners[rows][:, None] == owners[rows][None, :]) == same).all()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["settings"]["patient_pairs"] == 0.5
    assert meta["loss"][-1] < meta["loss"][0]


def test_dino_learns_and_keeps_the_teachers_encoder(tmp_path: Path) -> None:
    """DINO on tiny crops: the loss falls from the first epoch to the last; the cached weights
    are the teacher's encoder, a moving average of the student that is never trained itself."""
    pytest.importorskip("lightly")
    crops = np.stack([cell_crop(8 + i % 8, 12 + i % 8, seed=i)[::4, ::4] for i in range(64)])
    settings = pretrain.PretrainSettings(
        method="dino", epochs=6, batch_size=32, warmup_epochs=1, width=8, out_dim=16, hidden=32,
        temperature=0.1,
    )  # fmt: skip
    encoder, losses = pretrain.pretrain_encoder(crops, settings, IMAGENET_MEAN, IMAGENET_STD)
    assert losses[-1] < losses[0]
    path = pretrain.pretrained_encoder([crops], settings, IMAGENET_MEAN, IMAGENET_STD, tmp_path)
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in encoder.state_dict().items())

    torch.manual_seed(0)
    dino = pretrain._DINO(settings)
    teacher = {k: v.clone() for k, v in dino.teacher_encoder.state_dict().items()}
    assert not any(p.requires_grad for p in dino.teacher_encoder.parameters())
    x = torch.randn(8, 3, 16, 16)
    dino.loss(x, x.flip(-1)).backward()
    with torch.no_grad():
        for p in dino.encoder.parameters():
            p.add_(1.0)  # a step of the student
    dino.after_step(0.0)  # momentum DINO_TEACHER_MOMENTUM at the start
    m = pretrain.DINO_TEACHER_MOMENTUM
    for name, value in dino.teacher_encoder.state_dict().items():
        student = dino.encoder.state_dict()[name]
        torch.testing.assert_close(value, m * teacher[name] + (1 - m) * student)
    assert dino.kept_encoder() is dino.teacher_encoder
