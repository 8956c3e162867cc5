"""The feature cache: what it stores, when it is rebuilt, reuse across datamodules, heads on it."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from trainers import quiet_trainer

from lympho_mil.arguments import SettingError
from lympho_mil.data import (
    CropSpec,
    DataError,
    ImageCache,
    make_synthetic_dlmi,
    read_dlmi,
)
from lympho_mil.data import image_cache as image_cache_module
from lympho_mil.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BagToTensor,
    FeatureScaling,
    FeaturesToTensor,
)
from lympho_mil.dihedral import dihedral
from lympho_mil.features import cache as feature_cache_module
from lympho_mil.features.cache import (
    CachedFeatureDataModule,
    FeatureCache,
    FeatureSource,
    FeatureSpec,
    SelectView,
    feature_cache_key,
    weights_digest,
)
from lympho_mil.models import AttentionMIL, MeanPoolMIL
from lympho_mil.nn import MORPHOLOGY_FEATURES, EncoderSettings, SmallCNN

SIZE = 32
D = 16


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(width=8, out_dim=D)


def spec(**changes: object) -> FeatureSpec:
    settings: dict = {
        "encoder": "small_cnn",
        "crop": CropSpec(SIZE),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "dtype": "float32",
    }
    return FeatureSpec(**{**settings, **changes})


@pytest.fixture
def images(synthetic_dlmi: Path, cache_dir: Path) -> ImageCache:
    """Decoded crops of the first 40 files (enough for the cache's own tests)."""
    _, records = read_dlmi(synthetic_dlmi)
    paths = [p for r in records for p in r.paths][:40]
    return ImageCache.build_or_load(paths, CropSpec(SIZE), cache_dir)


@pytest.fixture
def extractions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Number of crops of every extraction that runs."""
    counted: list[int] = []
    real = feature_cache_module.extract_features

    def counting(images, n_crops, *args, **kwargs):  # type: ignore[no-untyped-def]
        counted.append(n_crops)
        return real(images, n_crops, *args, **kwargs)

    monkeypatch.setattr(feature_cache_module, "extract_features", counting)
    return counted


def make_dm(root: Path, cache_dir: Path, **kwargs: Any) -> CachedFeatureDataModule:
    """The datamodule of these tests; each group of ``kwargs`` updates its defaults."""
    groups: dict[str, dict[str, Any]] = {
        "crops": {"image_size": SIZE, "cache_dir": str(cache_dir)},
        "features": {"kwargs": {"width": 8, "out_dim": D}},
        "loader": {"batch_size": 3},
        "split": {"val_fraction": 0.3},
    }
    for name, settings in groups.items():
        settings.update(kwargs.pop(name, {}))
    return CachedFeatureDataModule(str(root), **groups, **kwargs)


# -- what is stored -----------------------------------------------------------------------------
def test_features_are_the_encoders_output_on_each_view(images: ImageCache, cache_dir: Path) -> None:
    encoder = small_cnn()
    cache = FeatureCache.build_or_load(images, encoder, spec(dihedral=True), cache_dir)
    assert cache.array.shape == (len(images), 8, D) and cache.views == 8 and cache.dim == D
    rows = np.array([0, 5, len(images) - 1])
    x = BagToTensor()(images[rows], np.random.default_rng(0))  # what image loaders feed
    with torch.no_grad():
        for view in (0, 3, 6):
            expected = encoder(dihedral(x, view)).numpy()
            np.testing.assert_allclose(cache[rows][:, view], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(cache[rows][:, 0], cache[rows][:, 1])


def test_morphology_features_do_not_depend_on_the_loaders_normalisation(
    synthetic_dlmi: Path, cache_dir: Path
) -> None:
    """The morphology encoder un-normalises with the loaders' mean and std: the same pixels
    give the same features (it used ImageNet's whatever the loaders used)."""
    stores = []
    for stats in ({}, {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}):
        features = {"encoder": "morphology", "kwargs": {}}
        dm = make_dm(synthetic_dlmi, cache_dir, features=features, crops=stats)
        stores.append(dm.build_store(dm.bags.values())[0])
    first, second = (np.asarray(s[np.arange(40)], np.float32)[:, 0] for s in stores)
    diameter = MORPHOLOGY_FEATURES.index("nucleus_diameter")
    assert (first[:, diameter] > 0.05).mean() > 0.5  # nuclei found (none with the old code)
    # equal but where a pixel sits exactly on a colour threshold (the flat colours of the
    # synthetic cells often do), which float rounding may put on either side
    assert np.isclose(first, second, atol=1e-3).all(axis=-1).mean() > 0.5
    assert np.isclose(first[:, diameter], second[:, diameter], atol=0.02).mean() > 0.8


def test_float16_storage(images: ImageCache, cache_dir: Path) -> None:
    half = FeatureCache.build_or_load(images, small_cnn(), spec(dtype="float16"), cache_dir)
    full = FeatureCache.build_or_load(images, small_cnn(), spec(), cache_dir)
    assert half.array.dtype == np.float16 and full.array.dtype == np.float32
    np.testing.assert_allclose(half.array, full.array, rtol=2e-3, atol=2e-3)


# -- keys and rebuilds --------------------------------------------------------------------------
def test_every_input_of_the_features_is_in_the_key() -> None:
    key = feature_cache_key(spec(), "w0", "crops-a")
    variants = [
        feature_cache_key(spec(), "w1", "crops-a"),  # other encoder weights
        feature_cache_key(spec(), "w0", "crops-b"),  # other decoded crops (files, crop spec)
        feature_cache_key(spec(crop=CropSpec(SIZE, center_crop=24)), "w0", "crops-a"),
        feature_cache_key(spec(encoder="resnet18"), "w0", "crops-a"),
        feature_cache_key(spec(encoder_kwargs=(("width", 4),)), "w0", "crops-a"),
        feature_cache_key(spec(dihedral=True), "w0", "crops-a"),
        feature_cache_key(spec(mean=(0.5, 0.5, 0.5)), "w0", "crops-a"),
        feature_cache_key(spec(std=(0.5, 0.5, 0.5)), "w0", "crops-a"),
        feature_cache_key(spec(dtype="float16"), "w0", "crops-a"),
    ]
    assert len({key, *variants}) == 1 + len(variants)
    assert feature_cache_key(spec(), "w0", "crops-a") == key
    assert (
        weights_digest(small_cnn(seed=1))
        != weights_digest(small_cnn())
        == weights_digest(small_cnn())
    )


def test_reused_until_an_input_changes(
    images: ImageCache, cache_dir: Path, extractions: list[int]
) -> None:
    base = FeatureCache.build_or_load(images, small_cnn(), spec(), cache_dir)
    again = FeatureCache.build_or_load(images, small_cnn(), spec(), cache_dir)
    assert again.path == base.path and len(extractions) == 1
    other = FeatureCache.build_or_load(images, small_cnn(seed=1), spec(), cache_dir)
    assert other.path != base.path and len(extractions) == 2
    assert not np.allclose(other.array, base.array)
    files = {p.name for p in cache_dir.glob("features-*")}
    suffixes = (".npy", ".json", ".npy.lock")  # the lock file of its build
    assert files == {c.path.with_suffix(s).name for c in (base, other) for s in suffixes}


@pytest.mark.parametrize("damage", ["flip", "flip_keep_mtime", "truncate"])
def test_corrupted_cache_is_rebuilt(
    images: ImageCache,
    cache_dir: Path,
    extractions: list[int],
    monkeypatch: pytest.MonkeyPatch,
    damage: str,
) -> None:
    cache = FeatureCache.build_or_load(images, small_cnn(), spec(), cache_dir)
    original = cache.array.copy()
    stat = cache.path.stat()
    data = bytearray(cache.path.read_bytes())
    data = data[: len(data) // 2] if damage == "truncate" else data[:-64] + bytes(64)
    cache.path.write_bytes(bytes(data))
    if damage == "flip_keep_mtime":  # silent corruption, seen by a new process
        import os

        os.utime(cache.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        monkeypatch.setattr(image_cache_module, "_VERIFIED", set())
    with pytest.warns(UserWarning, match="feature cache .* corrupted"):
        rebuilt = FeatureCache.build_or_load(images, small_cnn(), spec(), cache_dir)
    assert len(extractions) == 2
    np.testing.assert_array_equal(rebuilt.array, original)


def test_two_datamodules_share_one_extraction(
    synthetic_dlmi: Path, cache_dir: Path, extractions: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each fold of a cross-validation does: a new datamodule, other patients."""
    first = make_dm(synthetic_dlmi, cache_dir, split={"n_folds": 3, "fold": 0})
    first.setup("fit")
    monkeypatch.setattr(image_cache_module, "_VERIFIED", set())  # as a new process would
    second = make_dm(synthetic_dlmi, cache_dir, split={"n_folds": 3, "fold": 1})
    second.setup("fit")
    assert len(extractions) == 1
    assert first.datasets["train"].store.path == second.datasets["train"].store.path
    assert first.split_ids["val"] != second.split_ids["val"]
    make_dm(synthetic_dlmi, cache_dir, features={"seed": 1}).setup("fit")  # other random weights
    assert len(extractions) == 2


def test_encoder_weights_file_is_loaded(
    synthetic_dlmi: Path, cache_dir: Path, tmp_path: Path
) -> None:
    default = make_dm(synthetic_dlmi, cache_dir)
    trained = small_cnn(seed=7)
    torch.save(trained.state_dict(), tmp_path / "encoder.pt")
    loaded = make_dm(synthetic_dlmi, cache_dir, features={"weights": str(tmp_path / "encoder.pt")})
    assert weights_digest(loaded.extractor) == weights_digest(trained)
    assert weights_digest(default.extractor) != weights_digest(trained)
    assert weights_digest(make_dm(synthetic_dlmi, cache_dir).extractor) == weights_digest(
        default.extractor
    )  # random initial weights repeat under encoder_seed
    with pytest.raises(SettingError, match=r"--data.features '\{weights: null\}'"):
        FeatureSource(weights="None")  # what jsonargparse makes of --data.features.weights null
    missing = make_dm(synthetic_dlmi, cache_dir, features={"weights": str(tmp_path / "nowhere.pt")})
    for use in (lambda: missing.extractor, missing.input_settings):  # the first that reads it
        with pytest.raises(
            FileNotFoundError, match=r"nowhere\.pt\. .*lympho-mil pretrain --config"
        ):
            use()


# -- views --------------------------------------------------------------------------------------
def test_select_view_modes() -> None:
    features = np.random.default_rng(0).normal(size=(50, 8, 4)).astype(np.float16)
    to_tensor = FeaturesToTensor()
    picked = SelectView("random", to_tensor)(features, np.random.default_rng(1))
    assert picked.shape == (50, 4) and picked.dtype == torch.float32
    matches = (picked.numpy()[:, None, :] == features.astype(np.float32)).all(axis=-1)
    assert (matches.sum(axis=1) == 1).all()  # exactly one view of each crop
    assert len(set(matches.argmax(axis=1).tolist())) > 4  # views vary across crops
    again = SelectView("random", to_tensor)(features, np.random.default_rng(1))
    torch.testing.assert_close(picked, again)
    mean = SelectView("mean", to_tensor)(features, np.random.default_rng(1))
    np.testing.assert_allclose(mean.numpy(), features.astype(np.float32).mean(1), rtol=1e-6)
    identity = SelectView("identity", to_tensor)(features, np.random.default_rng(1))
    np.testing.assert_array_equal(identity.numpy(), features[:, 0].astype(np.float32))


# -- heads on cached features -------------------------------------------------------------------
def fit(model: L.LightningModule, dm: CachedFeatureDataModule) -> L.Trainer:
    trainer = quiet_trainer(
        max_epochs=1,
    )
    trainer.fit(model, dm)
    return trainer


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the tests below: they extract once."""
    return tmp_path_factory.mktemp("features")


@pytest.mark.parametrize(
    ("model_cls", "encoder", "dihedral"),
    [(AttentionMIL, "identity", True), (MeanPoolMIL, "mlp", False)],
)
def test_heads_train_and_predict_on_cached_features(
    synthetic_dlmi: Path, shared_cache: Path, model_cls: type, encoder: str, dihedral: bool
) -> None:
    L.seed_everything(0)
    dm = make_dm(synthetic_dlmi, shared_cache, features={"dihedral": dihedral}, max_instances=8)
    assert dm.feature_dim == D
    model = model_cls(
        encoder=EncoderSettings(encoder, in_dim=dm.feature_dim, out_dim=8),
        tabular_dim=dm.tabular_dim,
        tabular_stats=dm.tabular_stats,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer = fit(model, dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    batch = next(iter(dm.train_dataloader()))
    assert batch.instances.shape[-1] == D and batch.instances.dim() == 3
    assert batch.instances.dtype == torch.float32
    records = [r for b in trainer.predict(model, dm.val_dataloader()) for r in b]
    assert {r["id"] for r in records} == set(dm.split_ids["val"])
    assert all(0.0 <= r["probability"] <= 1.0 for r in records)


def test_in_dim_mismatch_names_both_sizes(synthetic_dlmi: Path, shared_cache: Path) -> None:
    dm = make_dm(synthetic_dlmi, shared_cache)
    features = EncoderSettings("identity", in_dim=D + 1)
    model = AttentionMIL(encoder=features, tabular_dim=dm.tabular_dim)
    with pytest.raises(
        DataError, match=rf"feature bags of {D + 1} values .* shape \(\d+, \d+, {D}\)"
    ):
        fit(model, dm)


def test_cross_validation_extracts_once(
    tmp_path: Path, cache_dir: Path, extractions: list[int]
) -> None:
    """Each fold run instantiates the datamodule from the config (through the CLI)."""
    from lympho_mil import cross_validate

    root = make_synthetic_dlmi(tmp_path / "dlmi", n_patients=20, image_size=SIZE, max_cells=16)
    config = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": False},
        "model": {
            "class_path": "AttentionMIL",
            "init_args": {"encoder": {"name": "identity", "in_dim": D}, "attention_hidden": 8},
        },
        "data": {
            "class_path": "CachedFeatureDataModule",
            "init_args": {
                "root": str(root),
                "crops": {"image_size": SIZE, "cache_dir": str(cache_dir)},
                "features": {"kwargs": {"width": 8, "out_dim": D}},
                "loader": {"batch_size": 4},
            },
        },
    }
    result = cross_validate(config, folds=2, n_bootstrap=10, verbose=False)
    labelled = {i for i, bag in make_dm(root, cache_dir).bags.items() if bag.label >= 0}
    assert len(result.runs) == 2 and set(result.oof["id"]) == labelled
    assert len(extractions) == 1


def test_standardisation_fits_the_readable_training_crops_only(
    dlmi_root: Path, cache_dir: Path
) -> None:
    dm = make_dm(dlmi_root, cache_dir, standardize=True, crops={"skip_bad_images": True})
    for pid in dm.split_ids["train"]:
        first = sorted((dlmi_root / "trainset" / pid).glob("*.jpg"))[0]
        first.write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="unreadable image"):
        dm.setup("fit")
    train = dm.datasets["train"]
    rows = np.sort(np.concatenate([b.rows for b in train.bags]))
    assert len(rows) < sum(len(dm.bags[i].rows) for i in dm.split_ids["train"])  # some unread
    expected = FeatureScaling.fit(train.store[rows].astype(np.float32).mean(axis=1))
    assert dm.scaling is not None
    np.testing.assert_allclose(dm.scaling.mean, expected.mean, rtol=1e-5)
    np.testing.assert_allclose(dm.scaling.low, expected.low)


def test_crop_augmentation_is_no_setting_of_the_feature_datamodule(synthetic_dlmi: Path) -> None:
    """It composes the crops and a feature source; it inherits no image setting to refuse."""
    assert "augment" not in inspect.signature(CachedFeatureDataModule).parameters
    with pytest.raises(TypeError, match="augment"):
        CachedFeatureDataModule(str(synthetic_dlmi), augment={"mode": "gpu"})  # type: ignore[call-arg]


@pytest.mark.parametrize("eval_view", ["mean", "identity"])
def test_training_draws_a_view_evaluation_sees_the_chosen_one(
    synthetic_dlmi: Path, shared_cache: Path, eval_view: str
) -> None:
    dm = make_dm(synthetic_dlmi, shared_cache, features={"dihedral": True, "eval_view": eval_view})
    dm.setup("fit")
    val = dm.datasets["val"]
    stored = np.asarray(val.store[val.bags[0].rows], dtype=np.float32)  # [n, 8 views, D]
    expected = stored.mean(axis=1) if eval_view == "mean" else stored[:, 0]
    for seed in (0, 1):
        np.testing.assert_allclose(val[(0, seed)].instances.numpy(), expected, rtol=1e-5)
    train = dm.datasets["train"]
    stored = np.asarray(train.store[train.bags[0].rows], dtype=np.float32)
    draws = [train[(0, seed)].instances.numpy() for seed in range(4)]
    assert all((draw[:, None] == stored).all(-1).any(1).all() for draw in draws)  # real views
    assert any(not np.array_equal(draws[0], draw) for draw in draws[1:])


def test_a_checkpoints_standardisation_of_another_feature_size_is_refused(
    synthetic_dlmi: Path, shared_cache: Path
) -> None:
    """As for feature bags (the same code): a DataError naming both sizes, and the data's
    own standardisation stays."""
    dm = make_dm(synthetic_dlmi, shared_cache, standardize=True)
    dm.setup("fit")
    state, own = dm.state_dict(), dm.scaling
    assert set(state) == {"feature_scaling"} and own is not None
    wider = FeatureScaling(*(np.ones(D + 1, np.float32) for _ in range(4)))
    with pytest.raises(DataError, match=rf"instances of {D + 1} values .* hold {D}"):
        dm.load_state_dict({"feature_scaling": wider.to_state()})
    assert dm.scaling is own
    narrower = FeatureScaling(*(np.full(D, 2.0, np.float32) for _ in range(4)))
    dm.load_state_dict({"feature_scaling": narrower.to_state()})  # the right size: applied
    view = dm.datasets["val"].to_tensor
    assert isinstance(view, SelectView) and view.scaling is dm.scaling
    np.testing.assert_array_equal(dm.scaling.mean, narrower.mean)
