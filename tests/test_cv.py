"""``lympho-mil cv`` on tiny synthetic data: splits, honest thresholds, reports, ensembles."""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from lightning import Trainer
from reports import without_timing
from sklearn.metrics import brier_score_loss

from lympho_mil import compare_configs, cross_validate
from lympho_mil.cli import main
from lympho_mil.cli.cv import config_and_overrides
from lympho_mil.data import Augmentation, CropSettings, LoaderSettings, PatientBagDataModule
from lympho_mil.data.errors import DataError
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.evaluation import ModuleRunner, run_cross_validation
from lympho_mil.evaluation.cv_plan import FOLD_FILE, PLAN_FILE
from lympho_mil.evaluation.report import COMPARISON_FILES, cv_output_names
from lympho_mil.evaluation.thresholds import choose_threshold
from lympho_mil.files import OutputExistsError
from lympho_mil.models import OptimSettings, TabularMLP
from lympho_mil.models.metrics import METRIC_NAMES

FOLDS, REPEATS = 3, 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cv")


@pytest.fixture(scope="module")
def dlmi_root(workdir: Path) -> Path:
    return make_synthetic_dlmi(
        workdir / "dlmi", n_patients=24, image_size=32, seed=2, min_cells=3, max_cells=8
    )


def data_section(root: Path, cache: Path, max_instances: int) -> dict[str, Any]:
    return {
        "class_path": "PatientBagDataModule",
        "init_args": {
            "root": str(root),
            "crops": {"image_size": 32, "cache_dir": str(cache)},
            "loader": {"batch_size": 4},
            "max_instances": max_instances,
            "augment": {"mode": "none"},
        },
    }


@pytest.fixture(scope="module")
def configs(workdir: Path, dlmi_root: Path) -> dict[str, Path]:
    cache = workdir / "cache"
    tabular = {
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "log_every_n_steps": 1},
        "model": {"class_path": "TabularMLP", "init_args": {"optim": {"lr": 0.01}}},
        "data": data_section(dlmi_root, cache, max_instances=1),
    }
    small = {
        **tabular,
        "model": {"class_path": "TabularMLP", "init_args": {"hidden": 4, "optim": {"lr": 0.05}}},
    }
    image = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "log_every_n_steps": 1},
        "model": {
            "class_path": "MeanPoolMIL",
            "init_args": {"encoder": {"name": "small_cnn", "kwargs": {"width": 4}, "out_dim": 8}},
        },
        "data": data_section(dlmi_root, cache, max_instances=4),
    }
    contents = {"tabular": tabular, "small": small, "image": image}
    paths = {name: workdir / f"{name}.yaml" for name in contents}
    for name, content in contents.items():
        paths[name].write_text(yaml.safe_dump(content))
    return paths


def cv_args(first: Path, *compared: Path, out: Path) -> list[str]:
    compare = [f"--cv.compare={json.dumps([str(c) for c in compared])}"] if compared else []
    return [
        "cv",
        "--config",
        str(first),
        *compare,
        f"--cv.folds={FOLDS}",
        f"--cv.repeats={REPEATS}",
        "--cv.seed=3",
        f"--cv.out={out}",
        "--cv.n_bootstrap=200",
        "--cv.predict=true",
        "--trainer.deterministic=true",
    ]


@pytest.fixture(scope="module")
def single(workdir: Path, configs: dict[str, Path]) -> Path:
    """One config, 3 folds x 2 repeats, with the fold ensemble."""
    out = workdir / "single"
    main(cv_args(configs["tabular"], out=out))
    return out


@pytest.fixture(scope="module")
def paired(workdir: Path, configs: dict[str, Path]) -> Path:
    """The same tabular config again (same seed) and a smaller one, compared."""
    out = workdir / "paired"
    main(cv_args(configs["tabular"], configs["small"], out=out))
    return out


def load_report(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "cv_report.json").read_text())


def labelled_ids(root: Path) -> set[str]:
    return set(pd.read_csv(root / "trainset" / "trainset_true.csv")["ID"])


def test_splits_are_disjoint_and_cover_every_patient(single: Path, dlmi_root: Path) -> None:
    report, everyone = load_report(single), labelled_ids(dlmi_root)
    assert report["n_patients"] == len(everyone)
    assert len(report["per_fold"]) == FOLDS * REPEATS
    for repeat in range(REPEATS):
        folds = [f for f in report["per_fold"] if f["repeat"] == repeat]
        tested = [pid for f in folds for pid in f["test_ids"]]
        assert sorted(tested) == sorted(everyone)  # each patient tested once per repeat
        for f in folds:
            train, val, test = set(f["train_ids"]), set(f["val_ids"]), set(f["test_ids"])
            assert not (train & val) and not (train & test) and not (val & test)
            assert train | val | test == everyone
            assert val  # an inner validation split exists in every fold
    first, second = (report["per_fold"][i]["test_ids"] for i in (0, FOLDS))
    assert first != second  # the repeats reshuffle


def test_oof_predictions_hold_each_patient_once_per_repeat(single: Path, dlmi_root: Path) -> None:
    oof = pd.read_csv(single / "oof_predictions.csv")
    assert list(oof.columns[:6]) == ["repeat", "fold", "id", "label", "probability", "predicted"]
    everyone = labelled_ids(dlmi_root)
    for _, rows in oof.groupby("repeat"):
        assert sorted(rows["id"]) == sorted(everyone)
    report = load_report(single)
    for f in report["per_fold"]:
        rows = oof[(oof["repeat"] == f["repeat"]) & (oof["fold"] == f["fold"])]
        assert sorted(rows["id"]) == sorted(f["test_ids"])
        np.testing.assert_array_equal(
            rows["predicted"], (rows["probability"] >= f["threshold"]).astype(int)
        )
    truth = pd.read_csv(dlmi_root / "trainset" / "trainset_true.csv").set_index("ID")["LABEL"]
    np.testing.assert_array_equal(oof["label"], truth.loc[oof["id"]].to_numpy())


def test_thresholds_come_from_inner_validation_only(single: Path) -> None:
    report = load_report(single)
    inner = pd.read_csv(single / "inner_val_predictions.csv")
    for f in report["per_fold"]:
        rows = inner[(inner["repeat"] == f["repeat"]) & (inner["fold"] == f["fold"])]
        # The threshold is a function of these rows alone, and none is a test patient.
        assert sorted(rows["id"]) == sorted(f["val_ids"])
        assert not set(rows["id"]) & set(f["test_ids"])
        recomputed = choose_threshold("inner_val", rows["probability"], rows["label"])
        assert f["threshold"] == pytest.approx(recomputed, abs=1e-6)
    assert len({f["threshold"] for f in report["per_fold"]}) > 1  # really chosen, not fixed


def test_each_fold_trains_under_its_own_seed(single: Path) -> None:
    for fold in load_report(single)["per_fold"]:
        r, k = fold["repeat"], fold["fold"]
        config = yaml.safe_load((single / "folds" / f"r{r}_f{k}" / "config.yaml").read_text())
        assert config["seed_everything"] == 3 + r * FOLDS + k


def test_report_has_every_key(single: Path) -> None:
    report = load_report(single)
    for key in ("n_patients", "folds", "repeats", "threshold_policy", "per_fold", "config"):
        assert key in report
    assert (report["folds"], report["repeats"], report["threshold_policy"]) == (3, 2, "inner_val")
    for name in METRIC_NAMES:
        s = report[name]
        assert set(s) == {"mean", "std", "ci95_low", "ci95_high"}
        assert 0.0 <= s["ci95_low"] <= s["ci95_high"] <= 1.0
    fold_keys = {"repeat", "fold", "train_ids", "val_ids", "test_ids", "threshold"}
    for f in report["per_fold"]:
        assert fold_keys | {"balanced_accuracy", "auroc"} <= set(f)
    assert report["seed"] == 3 and report["versions"]["lympho-mil"]
    assert report["config"]["content"]["model"]["class_path"] == "TabularMLP"
    assert "Cross-validation" in (single / "cv_report.md").read_text()
    pytest.importorskip("matplotlib")
    for name in ("roc.png", "precision_recall.png", "calibration.png"):
        assert (single / name).read_bytes()[:4] == b"\x89PNG"
    assert (single / "per_fold_balanced_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_gives_the_calibration_of_the_probabilities(single: Path) -> None:
    """Brier score and ECE (10 equal-width bins) of each repeat's out-of-fold probabilities,
    averaged over the repeats, against scikit-learn and a plain loop."""
    report = load_report(single)
    oof = pd.read_csv(single / "oof_predictions.csv")
    briers, eces = [], []
    for _, repeat in oof.groupby("repeat"):
        label, prob = repeat["label"].to_numpy(), repeat["probability"].to_numpy()
        briers.append(brier_score_loss(label, prob))
        bins = np.minimum((prob * 10).astype(int), 9)
        gaps = [
            abs(prob[bins == b].mean() - label[bins == b].mean()) * (bins == b).sum()
            for b in range(10)
            if (bins == b).any()
        ]
        eces.append(sum(gaps) / len(prob))
    calibration = report["calibration"]
    assert calibration["brier"]["mean"] == pytest.approx(np.mean(briers))
    assert calibration["ece"]["mean"] == pytest.approx(np.mean(eces))
    for summary in calibration.values():
        assert 0.0 <= summary["ci95_low"] <= summary["mean"] + 0.2
        assert summary["ci95_low"] <= summary["ci95_high"] <= 1.0
    assert "Brier score" in (single / "cv_report.md").read_text()


def test_same_seed_gives_the_same_report(single: Path, paired: Path) -> None:
    # The comparison ran the same tabular config on the same seed in another process state.
    again = paired / "tabular"
    assert without_timing(load_report(single)) == without_timing(load_report(again))
    pd.testing.assert_frame_equal(
        pd.read_csv(single / "oof_predictions.csv"), pd.read_csv(again / "oof_predictions.csv")
    )


def test_predict_writes_the_fold_ensemble(single: Path, dlmi_root: Path) -> None:
    submission = pd.read_csv(single / "predictions.csv")
    detail = pd.read_csv(single / "predictions_detail.csv").set_index("id")
    assert list(submission.columns) == ["Id", "Predicted"]
    unlabelled = pd.read_csv(dlmi_root / "testset" / "testset_data.csv")["ID"]
    assert sorted(submission["Id"]) == sorted(unlabelled)

    # Independent route: reload every fold's checkpoint and average it by hand.
    report = load_report(single)
    datamodule = PatientBagDataModule(
        str(dlmi_root), crops=CropSettings(image_size=32, cache_dir=str(single.parent / "cache"))
    )
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    probabilities = []
    for f in report["per_fold"]:
        model = TabularMLP.load_from_checkpoint(
            single / "folds" / f"r{f['repeat']}_f{f['fold']}" / "model.ckpt"
        )
        assert float(model.threshold) == pytest.approx(f["threshold"])  # carried in the file
        records = [r for b in trainer.predict(model, datamodule.predict_dataloader()) for r in b]
        probabilities.append(pd.Series({r["id"]: r["probability"] for r in records}))
    mean = pd.concat(probabilities, axis=1).mean(axis=1)
    threshold = float(np.median([f["threshold"] for f in report["per_fold"]]))
    np.testing.assert_allclose(detail.loc[mean.index, "probability"], mean, atol=1e-6)
    assert report["ensemble"]["threshold"] == pytest.approx(threshold)
    expected = (mean >= threshold).astype(int)
    assert submission.set_index("Id").loc[mean.index, "Predicted"].tolist() == expected.tolist()


def test_paired_comparison_table(paired: Path) -> None:
    table = json.loads((paired / "comparison.json").read_text())
    assert table["reference"] == "tabular" and table["models"] == ["tabular", "small"]
    reference, other = load_report(paired / "tabular"), load_report(paired / "small")
    pairs = list(zip(reference["per_fold"], other["per_fold"], strict=True))
    for a, b in pairs:  # identical splits
        assert [a[k] for k in ("train_ids", "val_ids", "test_ids")] == [
            b[k] for k in ("train_ids", "val_ids", "test_ids")
        ]
    diff = table["difference"]["small"]
    for name in METRIC_NAMES:
        assert diff[name]["ci95_low"] <= diff[name]["ci95_high"]
        assert diff[name]["mean"] == pytest.approx(other[name]["mean"] - reference[name]["mean"])
    per_split = [s["balanced_accuracy"] for s in table["per_split_difference"]["small"]]
    expected = [b["balanced_accuracy"] - a["balanced_accuracy"] for a, b in pairs]
    assert per_split == pytest.approx(expected)
    assert "Difference to tabular" in (paired / "comparison.md").read_text()


def test_existing_report_is_not_overwritten(single: Path, configs: dict[str, Path]) -> None:
    before = (single / "cv_report.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(cv_args(configs["tabular"], out=single))
    assert exc.value.code == 2
    assert (single / "cv_report.json").read_bytes() == before


def test_overwrite_clears_an_earlier_run_only_once_the_new_one_starts(
    single: Path, configs: dict[str, Path], tmp_path: Path
) -> None:
    out = Path(shutil.copytree(single, tmp_path / "again"))
    with pytest.raises(SystemExit):  # a typo: the earlier run's files must survive
        typo = ["--cv.overwrite=true", "--trainer.max_epocs=2"]
        main([*cv_args(configs["tabular"], out=out), *typo])
    assert (out / "folds" / "r1_f0" / "model.ckpt").is_file()
    assert (out / "predictions.csv").is_file()
    without_predict = [a for a in cv_args(configs["tabular"], out=out) if a != "--cv.predict=true"]
    main([*without_predict, "--cv.overwrite=true", "--cv.repeats=1"])
    assert not (out / "predictions.csv").exists()  # no ensemble of models that are gone
    assert sorted(p.name for p in (out / "folds").iterdir()) == [f"r0_f{i}" for i in range(FOLDS)]
    assert load_report(out)["repeats"] == 1


def test_overwrite_with_the_other_layout_leaves_nothing_of_the_earlier_run(
    paired: Path, configs: dict[str, Path], tmp_path: Path
) -> None:
    """A one-config run over an earlier comparison: the comparison files and its per-config
    folders go too (they would read as results of the new run)."""
    out = Path(shutil.copytree(paired, tmp_path / "out"))
    (out / "mine").mkdir()  # not the comparison's: stays
    cross_validate(
        configs["tabular"], folds=2, out_dir=out, overwrite=True, n_bootstrap=50, verbose=False
    )
    assert (out / "cv_report.json").is_file() and (out / "mine").is_dir()
    assert not (out / "comparison.md").exists()
    assert not [d for d in out.iterdir() if (d / "cv_report.json").exists()]


def test_python_api_with_a_dict_config_and_an_image_model(
    configs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(configs["image"].read_text())
    result = cross_validate(
        config,
        folds=2,
        repeats=1,
        seed=0,
        threshold_policy="fixed",
        overrides=["--trainer.max_epochs=1", "--model.threshold=0.7"],
        n_bootstrap=50,
        verbose=False,
    )
    assert result.out_dir is None and not list(tmp_path.iterdir())  # nothing written
    assert [f["threshold"] for f in result.report["per_fold"]] == pytest.approx([0.7, 0.7])
    assert (result.oof["threshold"] == result.report["per_fold"][0]["threshold"]).all()
    assert result.report["threshold_policy"] == "fixed"
    assert result.report["config"]["content"]["model"]["class_path"] == "MeanPoolMIL"
    assert result.report["config"]["source"] == "dict"
    assert result.oof["id"].is_unique and len(result.oof) == result.report["n_patients"]


def test_cross_validation_of_a_subset_of_patients(
    configs: dict[str, Path], dlmi_root: Path
) -> None:
    """What a nested cross-validation runs inside an outer training fold."""
    ids = sorted(labelled_ids(dlmi_root))
    labels = pd.read_csv(dlmi_root / "clinical_annotation.csv").set_index("ID")["LABEL"]
    pool = [i for i in ids if labels[i] == 0][:4] + [i for i in ids if labels[i] == 1][:8]
    result = cross_validate(
        configs["tabular"], folds=2, n_bootstrap=20, verbose=False, patients=pool
    )
    assert sorted(result.oof["id"]) == sorted(pool) and result.report["n_patients"] == len(pool)
    with pytest.raises(DataError, match="not among the labelled"):
        cross_validate(configs["tabular"], folds=2, verbose=False, patients=[*pool, "nobody"])


def test_an_option_neither_cv_nor_fit_knows_is_named(
    configs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(configs["tabular"])
    with pytest.raises(SystemExit) as exc:
        main(["cv", "--config", config, f"--cv.out={tmp_path}", "--fold", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown option --fold" in err and "cv --help" in err
    assert "did you mean --cv.folds?" in err and len(err.strip().splitlines()) <= 2
    # the value after an option written without '=' goes with it to every fold's fit
    args = ["--trainer.max_epochs", "-1", "-c", "x.yaml", "--model=TabularMLP", "--cv.folds", "3"]
    assert config_and_overrides(["--config", config, *args]) == (config, args[:-2])
    with pytest.raises(SystemExit):
        main(["cv", "--config", config, "--ckpt_path", "last"])
    assert "does not apply to cv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # cv's options, the fit config's, in one printout
        main(["cv", "--config", config, "--cv.folds=4", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert exc.value.code == 0 and printed["cv"]["folds"] == 4
    assert printed["model"]["class_path"].endswith("TabularMLP")
    with pytest.raises(SystemExit):  # two --config would be layered into one: refused
        main(["cv", "--config", config, "--config", config])
    assert "--cv.compare" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad", ["--cv.repeats=0", "--cv.folds=1", "--cv.n_bootstrap=0", "--cv.inner_folds=1"]
)
def test_bad_cv_settings_are_one_line_errors(
    configs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["cv", "--config", str(configs["tabular"]), f"--cv.out={tmp_path}", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert bad.split("=")[0] in err and "must be an integer >=" in err
    assert "Traceback" not in err


def test_predict_without_unlabelled_patients_says_how_to_name_them(
    configs: dict[str, Path], dlmi_root: Path, tmp_path: Path
) -> None:
    labelled_only = Path(shutil.copytree(dlmi_root, tmp_path / "dlmi"))
    shutil.rmtree(labelled_only / "testset")
    with pytest.raises(DataError, match=r"--data\.predict_ids"):
        cross_validate(
            configs["tabular"],
            folds=2,
            predict=True,
            overrides=[f"--data.root={labelled_only}"],
            verbose=False,
        )


@pytest.mark.parametrize("bad", [{"folds": 1}, {"inner_val_fraction": 1.0}, {"inner_folds": 1}])
def test_bad_settings_from_python_are_refused_before_any_work(
    configs: dict[str, Path], bad: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        cross_validate(configs["tabular"], verbose=False, **bad)


def test_compare_configs_needs_two(configs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="at least two configs"):
        compare_configs([configs["tabular"]])


def test_patients_named_to_predict_stay_out_of_the_folds(
    configs: dict[str, Path], dlmi_root: Path, tmp_path: Path
) -> None:
    """cv --predict with labelled predict_ids: no fold model trains on a patient it predicts."""
    labelled = sorted(p.name for p in (dlmi_root / "trainset").iterdir() if p.is_dir())
    chosen = labelled[:2]
    result = cross_validate(
        configs["tabular"],
        folds=2,
        predict=True,
        overrides=[f"--data.predict_ids={json.dumps(chosen)}", "--trainer.max_epochs=1"],
        out_dir=tmp_path / "cv",
        verbose=False,
    )
    assert not set(chosen) & set(result.oof["id"])
    for fold in result.report["per_fold"]:
        assert not set(chosen) & {*fold["train_ids"], *fold["val_ids"], *fold["test_ids"]}
    assert sorted(pd.read_csv(tmp_path / "cv" / "predictions_detail.csv")["id"]) == chosen


def test_each_fold_model_is_its_best_checkpoint_not_its_last_epoch(
    configs: dict[str, Path],
) -> None:
    """Monitoring the step, lowest first, epoch 0 is every fold's best checkpoint: training
    one epoch more must not change a single out-of-fold probability."""
    runs = []
    for epochs in (1, 2):
        overrides = [
            f"--trainer.max_epochs={epochs}",
            "--trainer.deterministic=true",
            "--checkpoint.monitor=step",
            "--checkpoint.mode=min",
            "--model.init_args.optim.scheduler=none",
        ]
        result = cross_validate(
            configs["tabular"], folds=2, overrides=overrides, n_bootstrap=50, verbose=False
        )
        runs.append(result.oof.sort_values(["repeat", "id"])["probability"].to_numpy())
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-6)


def test_a_bad_config_from_python_raises_instead_of_exiting(configs: dict[str, Path]) -> None:
    """The CLI's parser exits on a bad argument; from Python that would end the interpreter."""
    config = yaml.safe_load(configs["tabular"].read_text())
    config["model"]["init_args"]["no_such_argument"] = 1
    with pytest.raises(ValueError, match="no_such_argument"):
        cross_validate(config, folds=2, verbose=False)


def killed_after_the_first_fold(single: Path, folder: Path) -> Path:
    """A copy of ``single`` as a kill during its second fold leaves it: the plan, the first
    fold's model and record, the second fold's model without its record, no report."""
    out = Path(shutil.copytree(single, folder))
    for name in cv_output_names(predict=True):
        (out / name).unlink(missing_ok=True)
    for fold in sorted((out / "folds").iterdir())[1:]:
        (fold / FOLD_FILE).unlink()
        if fold.name != "r0_f1":
            shutil.rmtree(fold)
    return out


def test_a_killed_cv_run_again_resumes_to_the_uninterrupted_report(
    single: Path, configs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = killed_after_the_first_fold(single, tmp_path / "killed")
    kept = (out / "folds" / "r0_f0" / "model.ckpt").stat().st_mtime_ns
    main(cv_args(configs["tabular"], out=out))
    assert "resuming the cross-validation planned in" in capsys.readouterr().out
    assert (out / "folds" / "r0_f0" / "model.ckpt").stat().st_mtime_ns == kept  # not retrained
    assert without_timing(load_report(out)) == without_timing(load_report(single))
    for name in ("oof_predictions.csv", "inner_val_predictions.csv", "predictions_detail.csv"):
        assert (out / name).read_bytes() == (single / name).read_bytes()


def test_a_killed_comparison_resumes_to_the_uninterrupted_one(
    paired: Path, configs: dict[str, Path], tmp_path: Path
) -> None:
    """Killed during the second config's folds: the first config's are all kept."""
    out = Path(shutil.copytree(paired, tmp_path / "killed"))
    for name in COMPARISON_FILES:
        (out / name).unlink()
    for name in cv_output_names(predict=True):
        (out / "small" / name).unlink(missing_ok=True)
    for fold in sorted((out / "small" / "folds").iterdir())[2:]:
        shutil.rmtree(fold)
    main(cv_args(configs["tabular"], configs["small"], out=out))
    assert json.loads((out / "comparison.json").read_text()) == json.loads(
        (paired / "comparison.json").read_text()
    )
    assert without_timing(load_report(out / "small")) == without_timing(
        load_report(paired / "small")
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--trainer.max_epochs=3"], "the config of tabular (trainer.max_epochs: 2 -> 3)"),
        (["--cv.folds=2"], "--cv.folds 3 -> 2"),
        (
            ["--model.optim.lr=0.02", "--cv.seed=4"],
            "--cv.seed 3 -> 4; the config of tabular (model",
        ),
    ],
)
def test_a_killed_cv_run_again_otherwise_is_refused_naming_what_changed(
    single: Path,
    configs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: list[str],
    named: str,
) -> None:
    out = killed_after_the_first_fold(single, tmp_path / "killed")
    plan = (out / PLAN_FILE).read_bytes()
    with pytest.raises(SystemExit) as exc:
        main([*cv_args(configs["tabular"], out=out), *change])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lympho-mil: error: {out} holds an unfinished cross-validation")
    assert named in line and "--cv.overwrite" in line
    assert (out / PLAN_FILE).read_bytes() == plan and (out / "folds" / "r0_f0").is_dir()


def test_changed_data_is_refused_and_overwrite_starts_afresh(
    single: Path,
    configs: dict[str, Path],
    dlmi_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = killed_after_the_first_fold(single, tmp_path / "killed")
    crop = next((dlmi_root / "trainset").glob("*/*.*"))
    times = crop.stat()
    try:
        os.utime(crop, ns=(times.st_atime_ns, times.st_mtime_ns + 10**9))  # a replaced crop
        with pytest.raises(SystemExit):
            main(cv_args(configs["tabular"], out=out))
    finally:
        os.utime(crop, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert "the data of tabular (patients, labels" in capsys.readouterr().err
    without_predict = [a for a in cv_args(configs["tabular"], out=out) if a != "--cv.predict=true"]
    main([*without_predict, "--cv.overwrite=true", "--cv.repeats=1"])
    assert json.loads((out / PLAN_FILE).read_text())["settings"]["repeats"] == 1
    assert sorted(p.name for p in (out / "folds").iterdir()) == [f"r0_f{i}" for i in range(FOLDS)]


RUNNER_TRAINER = {
    "max_epochs": 2,
    "accelerator": "cpu",
    "log_every_n_steps": 1,
    "deterministic": True,
}


def tabular_runner(dlmi_root: Path, workdir: Path) -> ModuleRunner:
    """A `ModuleRunner` of Python callables: `TabularMLP` on the tiny patients."""
    return ModuleRunner(
        make_data=partial(
            PatientBagDataModule,
            str(dlmi_root),
            crops=CropSettings(image_size=32, cache_dir=str(workdir / "cache")),
            loader=LoaderSettings(batch_size=4),
            max_instances=1,
            augment=Augmentation(mode="none"),
        ),
        make_model=lambda dm: TabularMLP(
            tabular_dim=dm.tabular_dim,
            tabular_stats=dm.tabular_stats,
            optim=OptimSettings(lr=0.01),
        ),
        trainer=dict(RUNNER_TRAINER),
    )


def test_a_module_runner_cross_validates_without_configs_as_the_command_does(
    configs: dict[str, Path], dlmi_root: Path, workdir: Path
) -> None:
    """The evaluation layer trains folds through any runner: Python callables give the same
    folds, thresholds and probabilities as the config that the command line runs."""
    runner = tabular_runner(dlmi_root, workdir)
    settings: dict[str, Any] = {"folds": 2, "n_bootstrap": 50, "verbose": False}
    python = run_cross_validation(runner, **settings)
    command = cross_validate(
        configs["tabular"], overrides=["--trainer.deterministic=true"], **settings
    )
    pd.testing.assert_frame_equal(python.oof, command.oof)
    assert python.report["config"] == {"source": "python", "trainer": RUNNER_TRAINER}
    with pytest.raises(TypeError, match=r"lympho_mil\.cross_validate"):
        run_cross_validation(configs["tabular"])  # type: ignore[arg-type]


def test_predict_averages_the_fold_models_on_another_folder_of_patients(
    single: Path, configs: dict[str, Path], dlmi_root: Path, tmp_path: Path
) -> None:
    """The fold ensemble of a cv run predicts any cohort, by cv's own rule: on the cv run's
    unlabelled patients, copied into a folder of their own, it gives cv's predictions."""
    cohort = tmp_path / "cohort"
    shutil.copytree(dlmi_root / "testset", cohort / "testset")
    out = tmp_path / "predictions"
    base = ["predict", "--config", str(configs["tabular"]), "--data.root", str(cohort)]
    main([*base, "--ckpt_path", str(single), "--prediction.output_dir", str(out)])
    detail = pd.read_csv(out / "predictions_detail.csv").set_index("id")
    unlabelled = pd.read_csv(dlmi_root / "testset" / "testset_data.csv")["ID"]
    assert sorted(detail.index) == sorted(unlabelled)  # one prediction per patient
    expected = pd.read_csv(single / "predictions_detail.csv").set_index("id").loc[detail.index]
    np.testing.assert_allclose(detail["probability"], expected["probability"], atol=1e-6)
    assert detail["threshold"].tolist() == pytest.approx(expected["threshold"].tolist())
    assert not detail["in_sample"].any()
    # a list of checkpoints: the mean of their probabilities
    folds = [single / "folds" / f"r0_f{k}" / "model.ckpt" for k in range(2)]
    listed = [*base, "--ckpt_path", json.dumps([str(p) for p in folds])]
    main([*listed, "--prediction.output_dir", str(tmp_path / "two")])
    two = pd.read_csv(tmp_path / "two" / "predictions_detail.csv").set_index("id")
    alone = []
    for k, path in enumerate(folds):
        main([*base, "--ckpt_path", str(path), "--prediction.output_dir", str(tmp_path / f"{k}")])
        alone.append(pd.read_csv(tmp_path / f"{k}" / "predictions_detail.csv").set_index("id"))
    mean = (alone[0]["probability"] + alone[1]["probability"]) / 2
    np.testing.assert_allclose(two["probability"], mean.loc[two.index], atol=1e-6)


def test_cv_without_labelled_patients_is_one_line(
    configs: dict[str, Path], dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(dlmi_root / "testset", unlabelled / "testset")
    with pytest.raises(SystemExit) as exc:
        main(["cv", "--config", str(configs["tabular"]), "--data.root", str(unlabelled),
              f"--cv.out={tmp_path / 'cv'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no labelled patient" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_module_runner_resumes_a_killed_run_and_refuses_other_trainer_settings(
    dlmi_root: Path, workdir: Path, tmp_path: Path
) -> None:
    """Resuming is the evaluation layer's, whatever the runner: a runner without a resolved
    config is compared by its record (here its trainer arguments) and its data."""
    runner = tabular_runner(dlmi_root, workdir)
    out = tmp_path / "cv"
    settings: dict[str, Any] = {"folds": 2, "n_bootstrap": 50, "verbose": False, "out_dir": out}
    uninterrupted = run_cross_validation(runner, **settings)
    (out / "cv_report.json").unlink()  # killed during its second fold
    shutil.rmtree(out / "folds" / "r0_f1")
    kept = (out / "folds" / "r0_f0" / "model.ckpt").stat().st_mtime_ns
    resumed = run_cross_validation(runner, **settings)
    assert (out / "folds" / "r0_f0" / "model.ckpt").stat().st_mtime_ns == kept
    pd.testing.assert_frame_equal(resumed.oof, uninterrupted.oof)
    assert without_timing(resumed.report) == without_timing(uninterrupted.report)

    (out / "cv_report.json").unlink()
    runner.trainer = {**RUNNER_TRAINER, "max_epochs": 3}
    with pytest.raises(OutputExistsError, match=r"config\.trainer\.max_epochs: 2 -> 3"):
        run_cross_validation(runner, **settings)


def test_every_fold_keeps_the_datas_teacher_confidence(
    synthetic_dlmi: Path, tmp_path: Path
) -> None:
    """Co-training (``split.teacher_confidence``) survives the fold's explicit id lists, from
    a config (the ``fit`` overrides of `fold_args`) and from Python (`ModuleRunner`)."""
    from lympho_mil.cli.app import build_cli
    from lympho_mil.cli.cv import fold_args
    from lympho_mil.data import SplitSettings
    from lympho_mil.evaluation.cv_types import FoldSetup, FoldSplit

    ids = sorted(
        i for i, b in PatientBagDataModule(str(synthetic_dlmi)).bags.items() if b.label >= 0
    )
    setup = FoldSetup(FoldSplit(0, 0, ids[:5], ids[5:7], ids[7:]), 0, tmp_path, None)
    config = str(Path(__file__).parents[1] / "examples" / "configs" / "tabular_mlp.yaml")
    args = ["--config", config, f"--data.root={synthetic_dlmi}"]
    cli = build_cli([*args, "--data.split.teacher_confidence=0.6", *fold_args(setup)], run=False)
    assert cli.datamodule.split == SplitSettings(
        train_ids=ids[:5], val_ids=ids[5:7], test_ids=ids[7:], teacher_confidence=0.6
    )
    runner = ModuleRunner(
        make_data=partial(
            PatientBagDataModule, str(synthetic_dlmi), split=SplitSettings(teacher_confidence=0.7)
        ),
        make_model=lambda dm: TabularMLP(
            tabular_dim=dm.tabular_dim, tabular_stats=dm.tabular_stats
        ),
    )
    datamodule = runner.build(setup).datamodule
    assert datamodule.split.teacher_confidence == 0.7 and datamodule.split.train_ids == ids[:5]
    assert set(datamodule.split_ids["train"]) - set(ids[:5]) == set(datamodule.teacher_labels)
