"""Montages and the summary page, through the real ``lympho-mil predict --prediction.explain``."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from PIL import Image
from trainers import cli_trainer

from lympho_mil.cli import main
from lympho_mil.data import FeatureBagDataModule
from lympho_mil.data.errors import DataError
from lympho_mil.evaluation import PredictionWriter, explain
from lympho_mil.evaluation.explain import (
    EXPLANATION_FILE,
    MONTAGE_DIR,
    ExplainError,
    crop_scores,
    montage_size,
    rank_crops,
    write_explanations,
)
from lympho_mil.evaluation.predictions import prediction_tables
from lympho_mil.models import TabularMLP

TOP_K = 3


def predict_config(tmp_path: Path, root: Path, model: str) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": cli_trainer(tmp_path, logger=False),  # the root: where config.yaml goes
        "model": {
            "class_path": model,
            "init_args": {"encoder": {"name": "small_cnn", "kwargs": {"width": 8}, "out_dim": 16}},
        },
        "data": {
            "class_path": "PatientBagDataModule",
            "init_args": {
                "root": str(root),
                "crops": {"image_size": 32, "cache_dir": str(tmp_path / "c")},
            },
        },
        "prediction": {"explain": True, "explain_top_k": TOP_K},
    }
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("model", "kind"),
    [("AttentionMIL", "share of the decision"), ("InstanceMIL", "crop probability")],
)
def test_predict_explain_writes_one_montage_per_patient(
    synthetic_dlmi: Path, tmp_path: Path, model: str, kind: str
) -> None:
    out = tmp_path / "pred"
    config = predict_config(tmp_path, synthetic_dlmi, model)
    predict = ["predict", "--config", str(config), "--ckpt_path", str(one_step_checkpoint(config))]
    main([*predict, "--prediction.output_dir", str(out)])

    detail = pd.read_csv(out / "predictions_detail.csv", dtype={"id": str})
    montages = sorted((out / MONTAGE_DIR).iterdir())
    assert [p.name for p in montages] == [f"{pid}.png" for pid in sorted(detail["id"])]
    for path in montages:
        with Image.open(path) as image:
            assert image.format == "PNG"
            grid_width, height = montage_size(TOP_K)
            assert image.height == height and image.width >= grid_width  # wider: the title
            assert image.getextrema() != ((255, 255),) * 3  # not blank

    summary = (out / EXPLANATION_FILE).read_text()
    assert f"highest {kind}" in summary
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", summary)
    assert sorted(links) == [f"{MONTAGE_DIR}/{p.name}" for p in montages]
    assert all((out / link).is_file() for link in links)
    by_probability = detail.sort_values("probability", ascending=False, kind="stable")["id"]
    assert links == [f"{MONTAGE_DIR}/{pid}.png" for pid in by_probability]

    # a second run refuses to overwrite the summary page before predicting anything
    with pytest.raises(SystemExit):
        main([*predict, "--prediction.output_dir", str(out)])


def one_step_checkpoint(config: Path) -> Path:
    """``last.ckpt`` of one training step of ``config`` (predict needs a checkpoint)."""
    folder = config.parent / "ckpt"
    steps = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1"]
    main(["fit", "--config", str(config), *steps, f"--checkpoint.dirpath={folder}"])
    return folder / "last.ckpt"


def record(pid: str, weights: list[float] | None, crop_probability: list[float] | None) -> dict:
    n = len(weights or crop_probability or [0.0])
    return {
        "id": pid,
        "label": -1,
        "probability": 0.7,
        "threshold": 0.5,
        "n_instances": n,
        "instance_ids": [f"{i:06d}.jpg" for i in range(n)],
        "weights": weights,
        "instance_probability": crop_probability,
    }


def test_crop_scores_prefer_crop_probabilities() -> None:
    assert crop_scores(record("P1", [0.5, 0.5], [0.9, 0.1])) == ([0.9, 0.1], "crop probability")
    assert crop_scores(record("P1", [0.2, 0.8], None)) == ([0.2, 0.8], "share of the decision")
    with pytest.raises(ValueError, match="no per-crop score"):
        crop_scores(record("P1", None, None))


def test_rank_crops_disjoint_rows() -> None:
    scores = [0.1, 0.5, 0.3, 0.05, 0.05]
    assert rank_crops(scores, 2) == ([1, 2], [4, 3])
    assert rank_crops(scores, 3) == ([1, 2, 0], [4, 3])  # 5 crops < 2 * 3: top row first
    assert rank_crops([0.4, 0.6], 4) == ([1, 0], [])


def test_unsafe_patient_id_never_becomes_a_file_name(tmp_path: Path) -> None:
    crop = tmp_path / "000000.jpg"
    Image.new("RGB", (8, 8)).save(crop)
    with pytest.raises(DataError, match="not a plain folder name"):
        write_explanations([record("../evil", [1.0], None)], lambda _: [crop], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_explain_needs_a_datamodule_of_image_files(tmp_path: Path) -> None:
    writer = PredictionWriter(str(tmp_path), explain=True)
    trainer = SimpleNamespace(datamodule=FeatureBagDataModule(path="bags.csv"))
    with pytest.raises(ValueError, match="FeatureBagDataModule has none"):
        writer.on_predict_start(trainer, None)  # type: ignore[arg-type]


def test_explain_refuses_a_clinical_only_model_before_predicting(tmp_path: Path) -> None:
    writer = PredictionWriter(str(tmp_path), explain=True)
    trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(ExplainError, match="TabularMLP reads the clinical vector only"):
        writer.on_predict_start(trainer, TabularMLP(tabular_dim=3))  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_attention_table_holds_only_what_the_model_gives() -> None:
    tables = prediction_tables([record("P1", None, None), record("P2", None, None)])
    assert list(tables["attention.csv"].columns) == ["id", "file"]  # a clinical-only model
    tables = prediction_tables([record("P1", [0.25, 0.75], None)])
    at_threshold = {**record("P2", None, None), "probability": 0.5, "threshold": 0.5}
    detail = prediction_tables([at_threshold])["predictions_detail.csv"]
    assert detail["predicted"].tolist() == [1]  # p >= t: tumoral
    assert list(tables["attention.csv"].columns) == ["id", "file", "weight"]


def montages_of(
    weights: list[float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[list[str], list[str], tuple[str, str]]]:
    """(top row files, bottom row files, row labels) of the montage of one patient whose
    crops carry ``weights``, with ``top_k=2``."""
    names = [f"{i:06d}.jpg" for i in range(len(weights))]
    for name in names:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    drawn = []
    render = explain.render_montage

    def spy(title, top, bottom, top_k, labels, *args):  # type: ignore[no-untyped-def]
        drawn.append(([Path(p).name for p, _ in top], [Path(p).name for p, _ in bottom], labels))
        return render(title, top, bottom, top_k, labels, *args)

    monkeypatch.setattr(explain, "render_montage", spy)
    crops = record("P1", weights, None)
    write_explanations([crops], lambda _: [tmp_path / n for n in names], tmp_path / "out", top_k=2)
    return drawn


def test_montage_rows_hold_the_highest_and_lowest_scored_crops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert montages_of([0.1, 0.4, 0.05, 0.3, 0.15], tmp_path, monkeypatch) == [
        (
            ["000001.jpg", "000003.jpg"],
            ["000002.jpg", "000000.jpg"],
            ("highest share of the decision (uniform: 20.0%)", "lowest share of the decision"),
        )
    ]


def test_a_montage_of_equal_weights_does_not_rank_crops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mean pooling: equal shares are shown as such, not as the highest and lowest."""
    [(top, bottom, labels)] = montages_of([0.25] * 4, tmp_path, monkeypatch)
    assert labels == ("equal shares (25.0%): first crops", "last crops")
    assert top == ["000000.jpg", "000001.jpg"] and bottom == ["000003.jpg", "000002.jpg"]


def test_a_montage_of_few_crops_widens_to_its_whole_title(tmp_path: Path) -> None:
    crop = tmp_path / "000000.jpg"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(crop)
    title = "P123: tumoral (probability 0.873, threshold 0.412); label unknown; 154 crops"
    image = explain.render_montage(title, [(crop, "0.9")], [], 1, ("highest", "lowest"))
    grid_width = montage_size(1)[0]
    assert image.width > grid_width
    # ink reaches past the grid's width: the end of the title is drawn, not clipped
    header = image.crop((grid_width, 0, image.width, 20)).convert("L")
    assert header.getextrema()[0] < 128
