"""The DLMI recipe: standardised morphology features in the feature cache, and its configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lympho_mil.cli import main
from lympho_mil.data import CropSettings, CropSpec, SplitSettings, read_dlmi
from lympho_mil.data.image_cache import decode_crop
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.data.transforms import BagToTensor, FeatureScaling
from lympho_mil.features import CachedFeatureDataModule, FeatureSource
from lympho_mil.models import MeanPoolMIL
from lympho_mil.nn import MORPHOLOGY_FEATURES, EncoderSettings, MorphologyEncoder

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
RECIPE_CONFIGS = ("dlmi.yaml", "dlmi_attention.yaml")
SIZE = 32


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the morphology features of the synthetic patients: extracted once."""
    return tmp_path_factory.mktemp("morphology")


def morphology_dm(root: Path, cache_dir: Path, **kwargs: object) -> CachedFeatureDataModule:
    return CachedFeatureDataModule(
        str(root),
        features=FeatureSource(encoder="morphology", dtype="float32"),
        crops=CropSettings(image_size=SIZE, cache_dir=str(cache_dir)),
        split=SplitSettings(val_fraction=0.3),
        **kwargs,
    )


def stacked(dm: CachedFeatureDataModule, split: str) -> np.ndarray:
    """float[crops, D]: the features every crop of ``split`` reaches the model with."""
    dataset = dm.datasets[split]
    return np.concatenate([dataset[(i, 0)].instances.numpy() for i in range(len(dataset))])


def test_features_are_standardised_on_the_training_patients(
    synthetic_dlmi: Path, features_dir: Path
) -> None:
    raw = morphology_dm(synthetic_dlmi, features_dir)
    scaled = morphology_dm(synthetic_dlmi, features_dir, standardize=True)
    raw.setup("fit")
    scaled.setup("fit")
    assert raw.scaling is None and scaled.scaling is not None
    train_raw, train = stacked(raw, "train"), stacked(scaled, "train")
    assert train.shape == (len(train_raw), len(MORPHOLOGY_FEATURES))
    varying = train_raw.std(axis=0) > 1e-6
    assert varying.sum() > len(MORPHOLOGY_FEATURES) // 2  # the nuclei were found
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=0)[varying], 1.0, rtol=1e-3)
    np.testing.assert_allclose(
        train[:, varying] * scaled.scaling.scale[varying] + scaled.scaling.mean[varying],
        train_raw[:, varying],
        rtol=1e-4,
        atol=1e-5,
    )
    # validation crops are clipped to the training range, then scaled the same way
    val_raw, val = stacked(raw, "val"), stacked(scaled, "val")
    np.testing.assert_allclose(val, scaled.scaling(val_raw), rtol=1e-5, atol=1e-6)
    assert (val <= train.max(axis=0) + 1e-5).all() and (val >= train.min(axis=0) - 1e-5).all()


def test_feature_scaling_of_constant_and_out_of_range_values() -> None:
    scaling = FeatureScaling.fit(np.array([[0.0, 5.0], [2.0, 5.0]], np.float32))
    np.testing.assert_allclose(scaling.scale, [1.0, 1.0])  # std of [0, 2] is 1; constant -> 1
    np.testing.assert_allclose(scaling(np.array([[10.0, 7.0]], np.float32)), [[1.0, 0.0]])


def test_standardisation_travels_in_the_checkpoint(
    synthetic_dlmi: Path, features_dir: Path, tmp_path: Path
) -> None:
    """``predict`` from a checkpoint scales features as in training, whatever its own split."""
    trained = morphology_dm(synthetic_dlmi, features_dir, standardize=True, seed=0)
    model = MeanPoolMIL(encoder=EncoderSettings("identity", in_dim=len(MORPHOLOGY_FEATURES)))
    quiet = {"logger": False, "enable_progress_bar": False, "default_root_dir": tmp_path}
    trainer = L.Trainer(max_epochs=1, enable_checkpointing=False, **quiet)
    trainer.fit(model, trained)
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=True)
    other = morphology_dm(synthetic_dlmi, features_dir, standardize=True, seed=1)
    other.setup("predict")
    refitted = other.scaling
    assert refitted is not None and not np.allclose(refitted.mean, trained.scaling.mean)
    L.Trainer(**quiet).predict(model, datamodule=other, ckpt_path=checkpoint)
    restored = other.datasets["predict"].to_tensor.scaling
    for scaling in (other.scaling, restored):
        np.testing.assert_array_equal(scaling.mean, trained.scaling.mean)
        np.testing.assert_array_equal(scaling.scale, trained.scaling.scale)


@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_recipe_configs_match_the_feature_size(name: str) -> None:
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["data"]["init_args"]["features"]["encoder"] == "morphology"
    assert config["model"]["init_args"]["encoder"]["in_dim"] == len(MORPHOLOGY_FEATURES)


def recipe_args(root: Path, features_dir: Path) -> list[str]:
    """The recipe's config on the tiny synthetic crops (32 px, no centre crop)."""
    return [
        "--config",
        str(CONFIGS / "dlmi.yaml"),
        f"--data.root={root}",
        f"--data.crops.cache_dir={features_dir}",
        f"--data.crops.image_size={SIZE}",
        "--data.crops={center_crop: null}",  # a null inside a group: the group as a mapping
    ]


@pytest.mark.slow
def test_recipe_fits_and_predicts_through_the_cli(
    synthetic_dlmi: Path, features_dir: Path, tmp_path: Path
) -> None:
    common = [
        *recipe_args(synthetic_dlmi, features_dir),
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
    ]
    main(["fit", *common, "--trainer.max_epochs=2", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    best = sorted((tmp_path / "ckpt").glob("epoch*.ckpt"))
    assert best
    out = tmp_path / "pred"
    main(["predict", *common, f"--ckpt_path={best[0]}", f"--prediction.output_dir={out}"])
    submission = pd.read_csv(out / "predictions.csv")
    unlabelled = pd.read_csv(synthetic_dlmi / "testset" / "testset_data.csv")["ID"]
    assert sorted(submission["Id"]) == sorted(unlabelled)
    # a folder of new patients alone: the checkpoint's feature and clinical scaling apply
    cohort = tmp_path / "cohort"
    shutil.copytree(synthetic_dlmi / "testset", cohort / "testset")
    elsewhere = tmp_path / "pred_cohort"
    args = [f"--ckpt_path={best[0]}", f"--prediction.output_dir={elsewhere}"]
    main(["predict", *common, *args, f"--data.root={cohort}"])
    detail = pd.read_csv(out / "predictions_detail.csv").set_index("id").sort_index()
    again = pd.read_csv(elsewhere / "predictions_detail.csv").set_index("id").sort_index()
    assert again["probability"].to_numpy() == pytest.approx(detail["probability"].to_numpy())


@pytest.mark.slow
def test_recipe_cross_validates_through_the_cli(tmp_path: Path) -> None:
    """``lympho-mil cv`` with the recipe predicts every labelled patient once, out of fold,
    with the late-fusion experts' logits."""
    root = make_synthetic_dlmi(
        tmp_path / "dlmi", n_patients=24, image_size=SIZE, seed=2, min_cells=3, max_cells=8
    )
    out = tmp_path / "cv"
    args = ["--cv.folds=2", f"--cv.out={out}", "--cv.n_bootstrap=50", "--trainer.max_epochs=2"]
    main(["cv", *recipe_args(root, tmp_path / "cache"), *args])
    oof = pd.read_csv(out / "oof_predictions.csv")
    labelled = pd.read_csv(root / "trainset" / "trainset_true.csv")["ID"]
    assert sorted(oof["id"]) == sorted(labelled)
    assert oof["probability"].between(0, 1).all()
    model = torch.load(out / "folds" / "r0_f0" / "model.ckpt", weights_only=False)
    weights = model["state_dict"]
    assert {"net.fusion.image_head.weight", "net.fusion.tabular_head.weight"} <= set(weights)


@pytest.mark.slow
@pytest.mark.shared_data
def test_morphology_finds_the_nucleus_of_real_crops(shared_data: Path) -> None:
    """On real 112 px centre crops, the centred nucleus is found in nearly every crop."""
    _, records = read_dlmi(shared_data / "dlmi-dev")
    paths = [p for r in records[:4] for p in r.paths[:12]]
    crops = np.stack([decode_crop(p, CropSpec(112, 112)) for p in paths])
    with torch.no_grad():
        features = MorphologyEncoder()(BagToTensor()(crops, np.random.default_rng(0)))
    diameter = features[:, MORPHOLOGY_FEATURES.index("nucleus_diameter")]
    assert (diameter > 0.2).float().mean() > 0.9  # a lymphocyte nucleus spans ~50 px of 112
    assert ((diameter > 0.25) & (diameter < 0.85)).float().mean() > 0.9
