"""Checkpoints written by earlier versions load and predict as they did (``tests/data/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from trainers import quiet_trainer

from lympho_mil import AttentionMIL, GatedFusionMIL, InstanceMIL, TabularMLP
from lympho_mil.cli import main
from lympho_mil.data import PatientBagDataModule
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.features import CachedFeatureDataModule
from lympho_mil.models import CHECKPOINT_FORMAT, CheckpointFormatError, OptimSettings
from lympho_mil.models.checkpoint import _settings_from_format_1, upgrade
from lympho_mil.nn import PoolingSettings

DATA = Path(__file__).resolve().parent / "data"
EXPECTED = json.loads((DATA / "format1-probabilities.json").read_text())
TOLERANCE = 1e-5  # float32 sums differ in their last bits from one CPU's kernels to another's
DATA_SETTINGS: dict[str, dict[str, Any]] = {
    "tabular_mlp": {
        "class_path": "PatientBagDataModule",
        "init_args": {
            "crops": {"image_size": 8},
            "max_instances": 1,
            "augment": {"mode": "none"},
            "loader": {"batch_size": 4},
        },
    },
    "gated_fusion_mil": {
        "class_path": "CachedFeatureDataModule",
        "init_args": {
            "features": {"encoder": "morphology"},
            "crops": {"image_size": 32},
            "standardize": True,
            "noise_std": 0.1,
            "loader": {"batch_size": 4},
            "max_instances": 8,
        },
    },
}
MODELS = {"tabular_mlp": TabularMLP, "gated_fusion_mil": GatedFusionMIL}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic patients the fixtures were trained and predicted on."""
    folder = tmp_path_factory.mktemp("format1") / "dlmi"
    return make_synthetic_dlmi(
        folder, n_patients=12, image_size=32, seed=0, min_cells=4, max_cells=8
    )


def data_config(name: str, root: Path) -> dict[str, Any]:
    data = json.loads(json.dumps(DATA_SETTINGS[name]))
    data["init_args"].update(root=str(root), predict_ids=sorted(EXPECTED[name]))
    return data


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_format_1_checkpoint_predicts_as_it_did_on_the_command_line(
    name: str, root: Path, tmp_path: Path
) -> None:
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
        "model": {"class_path": MODELS[name].__name__},
        "data": data_config(name, root),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    ckpt = DATA / f"format1-{name}.ckpt"
    out = tmp_path / "pred"
    main(
        [
            "predict",
            "--config",
            str(path),
            "--ckpt_path",
            str(ckpt),
            "--prediction.output_dir",
            str(out),
        ]
    )
    detail = pd.read_csv(out / "predictions_detail.csv", dtype={"id": str})
    found = dict(zip(detail["id"], detail["probability"], strict=True))
    assert found == pytest.approx(EXPECTED[name], rel=TOLERANCE)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_format_1_checkpoint_predicts_as_it_did_from_python(name: str, root: Path) -> None:
    ckpt = DATA / f"format1-{name}.ckpt"
    model = MODELS[name].load_from_checkpoint(ckpt)
    data = data_config(name, root)
    dm_class = {"PatientBagDataModule": PatientBagDataModule}.get(
        data["class_path"], CachedFeatureDataModule
    )
    dm = dm_class(**data["init_args"])
    batches = quiet_trainer().predict(model, datamodule=dm, ckpt_path=ckpt)
    found = {r["id"]: r["probability"] for batch in batches for r in batch}
    assert found == pytest.approx(EXPECTED[name], rel=TOLERANCE)


def test_a_format_1_checkpoint_resumes_training(root: Path, tmp_path: Path) -> None:
    """Its optimiser state and schedule (one entry per parameter, in order) fit the network."""
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "max_epochs": 3},
        "model": {"class_path": "TabularMLP"},
        "data": data_config("tabular_mlp", root),
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--ckpt_path", str(DATA / "format1-tabular_mlp.ckpt")])
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["lympho_mil"]["format"] == CHECKPOINT_FORMAT
    assert set(resumed["state_dict"]) == set(TabularMLP(tabular_dim=3).state_dict())


def test_every_format_1_model_builds_from_its_converted_settings() -> None:
    """The arguments of each format-1 model class, as its checkpoints hold them."""
    common = {"lr": 0.003, "weight_decay": 0.01, "scheduler": "cosine", "tabular_dim": 3}
    encoder = {
        "encoder": "small_cnn",
        "embed_dim": 16,
        "in_dim": None,
        "encoder_kwargs": {"width": 8},
        "encoder_weights": None,
        "freeze_encoder": True,
        "chunk_size": 64,
        "shape_multiple": 4,
        "channels_last": False,
        "compile_encoder": False,
    }
    fusion = {"pooling": "mean", "fusion": "gated", "gate_input": "confidence", "gate_hidden": 8}
    cases = {
        AttentionMIL: {**common, **encoder, "attention_hidden": 8, "dropout": 0.1},
        InstanceMIL: {**common, **encoder, "dropout": 0.1},
        TabularMLP: {**common, "hidden": 8, "embed_dim": 4, "dropout": 0.1},
        GatedFusionMIL: {**common, **encoder, **fusion, "attention_hidden": 8, "dropout": 0.0},
    }
    for cls, hparams in cases.items():
        model = cls(**_settings_from_format_1(dict(hparams)))
        assert model.optim == OptimSettings(lr=0.003, weight_decay=0.01)
        if cls is not TabularMLP:
            settings = model.encoder_settings
            assert (settings.name, settings.out_dim, settings.kwargs) == (
                "small_cnn",
                16,
                {"width": 8},
            )
            assert settings.freeze and settings.shape_multiple == 4 and model.chunk_size == 64
    assert cases[GatedFusionMIL]["fusion"] == "gated"  # the input is left as it was
    fused = GatedFusionMIL(**_settings_from_format_1(dict(cases[GatedFusionMIL])))
    assert fused.pooling_settings == PoolingSettings("mean", hidden=8)
    assert (
        fused.fusion_settings.gate_input == "confidence" and fused.fusion_settings.gate_hidden == 8
    )


@pytest.mark.parametrize(("found", "hint"), [(None, "written by lympho-mil?"), (9, "a newer")])
def test_a_checkpoint_of_an_unknown_format_is_refused_naming_it(found: object, hint: str) -> None:
    checkpoint: dict[str, Any] = {"state_dict": {}, "lympho_mil": {"format": found}}
    with pytest.raises(CheckpointFormatError, match=rf"format {found!r} is not the one .*{hint}"):
        upgrade(checkpoint)
