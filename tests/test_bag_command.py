"""``lympho-mil bag``: the bag that ``cv --cv.inner_folds`` measures, fitted on every labelled
patient, and ``predict`` over its models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lightning import Trainer
from test_cv import configs, dlmi_root, single, workdir

from lympho_mil.cli import main
from lympho_mil.data import CropSettings, PatientBagDataModule
from lympho_mil.evaluation.thresholds import choose_threshold
from lympho_mil.models import TabularMLP

__all__ = ["configs", "dlmi_root", "single", "workdir"]  # test_cv's fixtures, used by name

MEMBERS = 3


def bag_args(config: Path, out: Path, *extra: str) -> list[str]:
    return [
        "bag",
        "--config",
        str(config),
        f"--bag.members={MEMBERS}",
        "--bag.seed=4",
        f"--bag.out={out}",
        "--trainer.deterministic=true",
        *extra,
    ]


@pytest.fixture(scope="module")
def bag(workdir: Path, configs: dict[str, Path]) -> Path:
    out = workdir / "bag"
    main(bag_args(configs["tabular"], out))
    return out


def report_of(bag: Path) -> dict:
    return json.loads((bag / "bag_report.json").read_text())


def test_every_labelled_patient_validates_one_member_and_trains_the_others(
    bag: Path, dlmi_root: Path
) -> None:
    labelled = set(pd.read_csv(dlmi_root / "trainset" / "trainset_true.csv")["ID"])
    splits = report_of(bag)["member_splits"]
    assert len(splits) == MEMBERS
    vals = [set(s["val_ids"]) for s in splits]
    assert set().union(*vals) == labelled and sum(map(len, vals)) == len(labelled)
    for s, val in zip(splits, vals, strict=True):
        assert set(s["train_ids"]) == labelled - val


def test_the_threshold_is_chosen_on_the_pooled_validation_and_stored_in_every_member(
    bag: Path, dlmi_root: Path
) -> None:
    """Independent route: reload each member, predict the patients it was validated on, and
    choose the threshold on all of them."""
    report = report_of(bag)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    cache = str(bag.parent / "cache")
    pooled: dict[str, tuple[int, float]] = {}
    for split, path in zip(report["member_splits"], report["models"], strict=True):
        model = TabularMLP.load_from_checkpoint(bag / path)
        assert float(model.threshold) == pytest.approx(report["threshold"])
        own = PatientBagDataModule(
            str(dlmi_root),
            crops=CropSettings(image_size=32, cache_dir=cache),
            predict_ids=split["val_ids"],
        )
        records = [r for b in trainer.predict(model, own.predict_dataloader()) for r in b]
        pooled |= {r["id"]: (r["label"], r["probability"]) for r in records}
    assert len(pooled) == sum(len(s["val_ids"]) for s in report["member_splits"])
    recorded = {r["id"]: r["probability"] for r in report["validation"]}
    assert recorded == pytest.approx({i: p for i, (_, p) in pooled.items()}, abs=1e-6)
    labels, probs = zip(*pooled.values(), strict=True)
    assert report["threshold"] == pytest.approx(choose_threshold("inner_val", probs, labels))


def test_predict_over_the_bag_is_its_members_mean_at_its_threshold(
    bag: Path,
    dlmi_root: Path,
    configs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "predictions"
    main(
        [
            "predict",
            "--config",
            str(configs["tabular"]),
            "--ckpt_path",
            str(bag),
            f"--prediction.output_dir={out}",
        ]
    )
    report = report_of(bag)
    said = capsys.readouterr().out
    assert f"threshold {report['threshold']:.3f} (the bag's, which every model carries" in said
    detail = pd.read_csv(out / "predictions_detail.csv").set_index("id")
    datamodule = PatientBagDataModule(
        str(dlmi_root), crops=CropSettings(image_size=32, cache_dir=str(bag.parent / "cache"))
    )
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    each = []
    for path in report["models"]:
        model = TabularMLP.load_from_checkpoint(bag / path)
        records = [r for b in trainer.predict(model, datamodule.predict_dataloader()) for r in b]
        each.append(pd.Series({r["id"]: r["probability"] for r in records}))
    mean = pd.concat(each, axis=1).mean(axis=1)
    np.testing.assert_allclose(detail.loc[mean.index, "probability"], mean, atol=1e-6)
    expected = (mean >= report["threshold"]).astype(int)
    assert detail.loc[mean.index, "predicted"].tolist() == expected.tolist()


def test_an_earlier_bag_is_kept_unless_overwrite_and_then_replaced_whole(
    bag: Path, configs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(bag_args(configs["tabular"], bag))
    assert exc.value.code == 2 and "--bag.overwrite true" in capsys.readouterr().err
    out = Path(shutil.copytree(bag, tmp_path / "bag"))
    main([*bag_args(configs["tabular"], out, "--bag.overwrite=true"), "--bag.members=2"])
    assert len(list((out / "folds").glob("*/model.ckpt"))) == 2  # none of the three before
    assert report_of(out)["members"] == 2 and not (out / ".bag-partial").exists()


def test_a_fixed_threshold_is_the_members_setting_and_said_so(
    configs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fixed"
    main(bag_args(configs["tabular"], out, "--threshold_policy=fixed", "--model.threshold=0.3"))
    said = capsys.readouterr().out
    assert "fixed: the members' threshold setting" in said and "optimistic" not in said
    report = report_of(out)
    assert report["threshold"] == pytest.approx(0.3)
    for path in report["models"]:
        assert float(TabularMLP.load_from_checkpoint(out / path).threshold) == pytest.approx(0.3)


def test_a_bag_is_not_written_into_a_cross_validation(
    single: Path, configs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(bag_args(configs["tabular"], single, "--bag.overwrite=true"))
    assert exc.value.code == 2 and "holds a cross-validation" in capsys.readouterr().err
    assert not (single / "bag_report.json").exists()


def test_a_cv_fold_ensemble_is_not_called_a_bag(
    configs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Plain folds with the fixed policy carry equal thresholds and choices: still not a bag."""
    out = tmp_path / "cv"
    config = str(configs["tabular"])
    main(["cv", "--config", config, "--cv.folds=2", f"--cv.out={out}", "--threshold_policy=fixed"])
    capsys.readouterr()
    main(["predict", "--config", config, "--ckpt_path", str(out), "--prediction.output_dir",
          str(tmp_path / "predictions")])  # fmt: skip
    said = capsys.readouterr().out
    assert "median of the fold thresholds" in said and "the bag's" not in said


def test_one_member_is_a_one_line_error(
    configs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*bag_args(configs["tabular"], tmp_path / "bag"), "--bag.members=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--bag.members must be an integer >= 2" in err and "Traceback" not in err
