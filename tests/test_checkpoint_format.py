"""Checkpoints written by earlier versions load and predict as they did (``tests/data/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from trainers import quiet_trainer

from lympho_mil import GatedFusionMIL, TabularMLP
from lympho_mil.cli import main
from lympho_mil.data import PatientBagDataModule
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.features import CachedFeatureDataModule

DATA = Path(__file__).resolve().parent / "data"
EXPECTED = json.loads((DATA / "format1-probabilities.json").read_text())
DATA_SETTINGS: dict[str, dict[str, Any]] = {
    "tabular_mlp": {
        "class_path": "PatientBagDataModule",
        "init_args": {"image_size": 8, "max_instances": 1, "augment": False, "batch_size": 4},
    },
    "gated_fusion_mil": {
        "class_path": "CachedFeatureDataModule",
        "init_args": {
            "encoder": "morphology",
            "image_size": 32,
            "standardize": True,
            "noise_std": 0.1,
            "batch_size": 4,
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
    assert dict(zip(detail["id"], detail["probability"], strict=True)) == EXPECTED[name]


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
    assert found == EXPECTED[name]
