"""``lympho-mil evaluate`` on tiny synthetic cohorts: checkpoints scored on another labelled
cohort, every file written, figures checked against scikit-learn, paired comparison, bad input
refused in one line with nothing written. The bar on the real data is at the end."""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from independent import sklearn_metrics
from sklearn.model_selection import train_test_split
from trainers import cli_trainer

from lympho_mil import evaluate_checkpoints
from lympho_mil.cli import main
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.evaluation.external import EVALUATION_FILES, REFITTED

METRICS = ("balanced_accuracy", "auroc", "sensitivity", "specificity", "ppv", "npv", "f1")


# -- data, configs and checkpoints ------------------------------------------------------------
def renamed(root: Path, prefix: str) -> Path:
    """The DLMI folder ``root`` with every patient id prefixed (another hospital's patients:
    none shares an id with the training data, so none is in sample)."""
    for csv in root.rglob("*.csv"):
        first_column_is_index = csv.read_text().startswith(",")
        table = pd.read_csv(csv, dtype=str, index_col=0 if first_column_is_index else None)
        table["ID"] = prefix + table["ID"]
        table.to_csv(csv, index=first_column_is_index)
    for split in ("trainset", "testset"):
        for folder in [p for p in (root / split).iterdir() if p.is_dir()]:
            folder.rename(folder.with_name(prefix + folder.name))
    return root


def labels_of(root: Path) -> pd.Series:
    """LABEL by patient id (-1: unknown)."""
    table = pd.read_csv(root / "clinical_annotation.csv", index_col=0, dtype={"ID": str})
    return table.set_index("ID")["LABEL"]


def write_config(path: Path, model: str, init: dict[str, Any], data: dict[str, Any]) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": cli_trainer(path.parent / path.stem, max_epochs=2, logger=False),
        "model": {"class_path": model, "init_args": init},
        "data": {"class_path": data.pop("class_path", "PatientBagDataModule"), "init_args": data},
        "checkpoint": {"dirpath": str(path.parent / f"ckpt_{path.stem}")},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def train_root(workdir: Path) -> Path:
    return make_synthetic_dlmi(
        workdir / "train", n_patients=16, image_size=32, seed=1, max_cells=18
    )


@pytest.fixture(scope="module")
def cohort(workdir: Path) -> Path:
    """Another labelled cohort (24 patients, 5 of them without a label)."""
    root = make_synthetic_dlmi(
        workdir / "cohort", n_patients=24, image_size=32, seed=2, max_cells=18
    )
    return renamed(root, "C")


@pytest.fixture(scope="module")
def configs(workdir: Path) -> dict[str, Path]:
    data = {"crops": {"image_size": 32}, "loader": {"batch_size": 4}, "max_instances": 8}
    small = {"encoder": {"name": "small_cnn", "kwargs": {"width": 8}, "out_dim": 16}}
    return {
        "att": write_config(workdir / "att.yaml", "AttentionMIL", small, dict(data)),
        "tab": write_config(workdir / "tab.yaml", "TabularMLP", {}, dict(data)),
    }


@pytest.fixture(scope="module")
def best(configs: dict[str, Path], train_root: Path) -> dict[str, Path]:
    """Each config's best checkpoint, fitted on the training cohort."""
    found = {}
    for name, config in configs.items():
        with contextlib.redirect_stdout(io.StringIO()):
            main(["fit", "--config", str(config), "--data.root", str(train_root)])
        (found[name],) = sorted((config.parent / f"ckpt_{name}").glob("epoch*.ckpt"))
    return found


def evaluate(config: Path, ckpt: Path | str, root: Path, out: Path, *extra: str) -> str:
    """Run ``lympho-mil evaluate``; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["evaluate", "--config", str(config), "--ckpt_path", str(ckpt), "--data.root",
              str(root), f"--evaluate.out={out}", *extra])  # fmt: skip
    return printed.getvalue()


def compare(config: Path, ckpt: Path | str, **more: str) -> str:
    return "--evaluate.compare=" + json.dumps(
        [{"config": str(config), "ckpt_path": str(ckpt), **more}]
    )


# -- an independent computation -----------------------------------------------------------------
def by_sklearn(label: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    figures = sklearn_metrics(label, prob, threshold)
    for target in (0.95, 0.98):  # every probability tried as the referral threshold
        tumoral = prob[label == 1]
        t = next(t for t in np.unique(prob)[::-1] if (tumoral >= t).mean() >= target - 1e-12)
        figures[f"referral {target} threshold"] = t
        figures[f"referral {target} skip_fraction"] = (prob < t).mean()
    return figures


def reported(entry: dict[str, Any]) -> dict[str, float]:
    figures = {name: value["estimate"] for name, value in entry["metrics"].items()}
    for point in entry["referral"]:
        for name in ("threshold", "skip_fraction"):
            figures[f"referral {point['target_sensitivity']} {name}"] = point[name]["estimate"]
    return figures


def check_against_sklearn(out: Path, report: dict[str, Any]) -> None:
    """Every model's figures equal those computed from its written per-patient table."""
    for name, entry in report["models"].items():
        table = pd.read_csv(out / "predictions" / name / "predictions_detail.csv")
        table = table[table["label"] != -1]
        label, prob = table["label"].to_numpy(), table["probability"].to_numpy()
        assert entry["threshold"] == pytest.approx(table["threshold"].iloc[0])
        expected = by_sklearn(label, prob, entry["threshold"])
        got = reported(entry)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (name, key)
        for value in entry["metrics"].values():
            assert value["ci95_low"] <= value["estimate"] + 1e-12
            assert value["estimate"] <= value["ci95_high"] + 1e-12


def refused(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """The one line of a refused command (exit 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()):
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lympho-mil: error: "), err
    return lines[0]


# -- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(
    configs: dict[str, Path], best: dict[str, Path], cohort: Path, workdir: Path
) -> tuple[Path, str]:
    """AttentionMIL with montages, and TabularMLP compared with it, on the cohort."""
    out = workdir / "evaluation"
    printed = evaluate(
        configs["att"], best["att"], cohort, out, compare(configs["tab"], best["tab"]),
        "--evaluate.n_bootstrap=300", "--evaluate.seed=5", "--evaluate.explain=true",
    )  # fmt: skip
    return out, printed


def test_every_file_is_written_and_the_figures_match_scikit_learn(
    evaluated: tuple[Path, str], best: dict[str, Path], cohort: Path
) -> None:
    out, printed = evaluated
    assert {p.name for p in out.iterdir()} == {*EVALUATION_FILES, "predictions"}
    labels = labels_of(cohort)
    for name in ("att", "tab"):
        folder = out / "predictions" / name
        detail = pd.read_csv(folder / "predictions_detail.csv")
        assert sorted(detail["id"]) == sorted(labels.index)  # every patient of the cohort
        assert not detail["in_sample"].any()
    montages = {p.stem for p in (out / "predictions" / "att" / "montages").glob("*.png")}
    assert montages == set(labels.index)
    assert not (out / "predictions" / "tab" / "montages").exists()  # it reads no crop

    report = json.loads((out / "evaluation.json").read_text())
    assert report["n_patients"] == (labels != -1).sum()
    assert report["n_unlabelled_left_out"] == (labels == -1).sum() == 5
    assert (report["n_tumoral"], report["n_reactive"]) == ((labels == 1).sum(), (labels == 0).sum())
    assert report["bootstrap"]["resamples"] == 300 and report["bootstrap"]["seed"] == 5
    check_against_sklearn(out, report)

    # the threshold: the checkpoint's, said in the report
    page = (out / "report.html").read_text()
    for name, entry in report["models"].items():
        stored = torch.load(best[name], map_location="cpu", weights_only=True)
        assert entry["threshold"] == pytest.approx(float(stored["state_dict"]["threshold"]))
        source = f"checkpoint {best[name]}: chosen on its "
        assert entry["threshold_source"].startswith(source) and not report["threshold_refitted"]
        assert html.escape(entry["threshold_source"]) in page
        assert f"threshold {entry['threshold']:.3f} (chosen on its" in printed

    # the paired comparison, in the same report
    difference = report["comparison"]["differences"]["tab"]
    assert report["comparison"]["reference"] == "att"
    for metric in ("balanced_accuracy", "auroc"):
        d = difference[metric]
        expected = (
            report["models"]["tab"]["metrics"][metric]["estimate"]
            - report["models"]["att"]["metrics"][metric]["estimate"]
        )
        assert d["estimate"] == pytest.approx(expected)
        assert d["ci95_low"] <= d["estimate"] <= d["ci95_high"]
    assert "tab - att: balanced accuracy" in printed and "Paired" in page

    # each patient links its montage where the model ranks crops
    for patient in report["patients"]:
        link = patient["models"]["att"]["montage"]
        assert link == f"predictions/att/montages/{patient['id']}.png" and (out / link).is_file()
        assert f'href="{link}"' in page and patient["models"]["tab"]["montage"] is None
    assert f"report: {out / 'report.html'}" in printed


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium_with_its_montages(
    evaluated: tuple[Path, str], tmp_path: Path
) -> None:
    """The page as a browser shows it: every patient, and each montage link resolves to a
    file beside the report (no server, nothing fetched)."""
    browser = next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
        None,
    )
    if browser is None:
        pytest.skip("headless Chromium is not installed")
    out, _ = evaluated
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    page = (out / "report.html").as_uri()
    dom = subprocess.run(
        [*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    report = json.loads((out / "evaluation.json").read_text())
    assert all(p["id"] in dom for p in report["patients"])
    links = re.findall(r'href="([^"]+)"', dom)
    assert len(links) == len(report["patients"])
    assert all((out / urllib.parse.unquote(link)).is_file() for link in links)
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,1600", f"--screenshot={shot}", page],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.stat().st_size > 10_000  # text, tables and figures, not a blank page


def test_a_second_run_with_the_same_seed_gives_identical_numbers(
    evaluated: tuple[Path, str], configs: dict[str, Path], best: dict[str, Path], cohort: Path
) -> None:
    """Run again from the config that --print_config writes (its evaluate: section and
    ckpt_path): the same evaluation.json and evaluation.md."""
    out, _ = evaluated
    args = ["evaluate", "--config", str(configs["att"]), "--ckpt_path", str(best["att"]),
            "--data.root", str(cohort), compare(configs["tab"], best["tab"]),
            "--evaluate.n_bootstrap=300", "--evaluate.seed=5", "--evaluate.explain=true",
            "--evaluate.name=att", "--print_config"]  # fmt: skip
    printed = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(printed):
        main(args)
    assert exc.value.code == 0
    saved = out.parent / "printed.yaml"
    saved.write_text(printed.getvalue())
    content = yaml.safe_load(saved.read_text())
    assert content["ckpt_path"] == str(best["att"]) and content["evaluate"]["seed"] == 5
    again = out.parent / "again"
    with contextlib.redirect_stdout(io.StringIO()):
        main(["evaluate", "--config", str(saved), f"--evaluate.out={again}"])
    for name in ("evaluation.json", "evaluation.md"):
        assert (again / name).read_text() == (out / name).read_text()


def test_an_earlier_evaluation_is_never_silently_overwritten(
    configs: dict[str, Path],
    best: dict[str, Path],
    cohort: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "evaluation"
    evaluate(configs["tab"], best["tab"], cohort, out, "--evaluate.n_bootstrap=50")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    args = ["evaluate", "--config", str(configs["tab"]), "--ckpt_path", str(best["tab"]),
            "--data.root", str(cohort), f"--evaluate.out={out}",
            "--evaluate.n_bootstrap=50"]  # fmt: skip
    assert "--evaluate.overwrite true" in refused(capsys, args)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before
    with contextlib.redirect_stdout(io.StringIO()):
        main([*args, "--evaluate.overwrite=true", "--evaluate.seed=1"])
    report = json.loads((out / "evaluation.json").read_text())
    assert report["bootstrap"]["seed"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([*EVALUATION_FILES, "predictions"])


def test_a_fold_ensemble_a_refitted_threshold_and_chosen_patients_from_python(
    configs: dict[str, Path], best: dict[str, Path], cohort: Path, tmp_path: Path
) -> None:
    """--ckpt_path a list (the fold ensemble, by cv's rule), --data.predict_ids restricting
    the patients, refit_threshold said in the report."""
    last = best["att"].with_name("last.ckpt")
    labels = labels_of(cohort)
    chosen = sorted(labels[labels != -1].index)[:12]
    assert set(labels[chosen]) == {0, 1}
    with contextlib.redirect_stdout(io.StringIO()):
        report = evaluate_checkpoints(
            configs["att"],
            json.dumps([str(best["att"]), str(last)]),
            tmp_path / "out",
            overrides=[f"--data.root={cohort}", f"--data.predict_ids={json.dumps(chosen)}"],
            name="ensemble",
            refit_threshold=True,
            n_bootstrap=50,
        )
    entry = report["models"]["ensemble"]
    assert entry["model_threshold_source"].startswith("fold ensemble of 2 checkpoints")
    assert entry["threshold_source"] == REFITTED and report["threshold_refitted"]
    assert report["n_patients"] == len(chosen)
    assert "refitted on this cohort" in (tmp_path / "out" / "report.html").read_text()


def test_compared_models_read_the_first_ones_cohort_wherever_their_configs_point(
    configs: dict[str, Path], best: dict[str, Path], cohort: Path, train_root: Path, tmp_path: Path
) -> None:
    """The cohort named by the first model's config (not on the command line) is the one
    every compared model predicts, though the compared config names the training data."""
    here, elsewhere = (tmp_path / f"{name}.yaml" for name in ("here", "elsewhere"))
    for path, root in ((here, cohort), (elsewhere, train_root)):
        content = yaml.safe_load(configs["tab"].read_text())
        content["data"]["init_args"]["root"] = str(root)
        path.write_text(yaml.safe_dump(content))
    with contextlib.redirect_stdout(io.StringIO()):
        report = evaluate_checkpoints(
            here,
            best["tab"],
            tmp_path / "out",
            compare=[{"config": str(elsewhere), "ckpt_path": str(best["tab"])}],
            n_bootstrap=20,
        )
    assert set(report["models"]) == {"here", "elsewhere"}
    for name in report["models"]:
        table = pd.read_csv(tmp_path / "out" / "predictions" / name / "predictions_detail.csv")
        assert sorted(table["id"]) == sorted(labels_of(cohort).index)


def test_evaluate_is_a_subcommand_with_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "evaluate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for option in ("--ckpt_path", "--evaluate.out", "--evaluate.compare", "--evaluate.overwrite",
                   "--evaluate.refit_threshold", "--evaluate.n_bootstrap", "--evaluate.seed",
                   "--evaluate.explain"):  # fmt: skip
        assert option in text


# -- bad input: one line, exit 2, nothing written -------------------------------------------------
def bad_cohort(cohort: Path, out: Path, case: str) -> Path:
    root = Path(shutil.copytree(cohort, out))
    labels = labels_of(cohort)
    if case == "no labels":
        keep = labels[labels == -1].index
    elif case == "one class":
        keep = labels[labels != 0].index
    else:  # a patient whose folder holds no crop
        for crop in (root / "trainset" / labels[labels == 1].index[0]).iterdir():
            crop.unlink()
        return root
    for split in ("trainset", "testset"):
        for folder in (root / split).iterdir():
            if folder.is_dir() and folder.name not in keep:
                shutil.rmtree(folder)
        csv = root / split / f"{split}_{'true' if split == 'trainset' else 'data'}.csv"
        table = pd.read_csv(csv, dtype=str)
        table[table["ID"].isin(keep)].to_csv(csv, index=False)
    table = pd.read_csv(root / "clinical_annotation.csv", index_col=0, dtype=str)
    table[table["ID"].isin(keep)].to_csv(root / "clinical_annotation.csv")
    return root


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no labels", "has no labelled patient (every LABEL is -1)"),
        ("one class", "is tumoral (LABEL 1): the figures need both classes"),
        ("no crops", "holds no image"),
    ],
)
def test_a_bad_cohort_is_one_line_with_nothing_written(
    configs: dict[str, Path],
    best: dict[str, Path],
    cohort: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    root = bad_cohort(cohort, tmp_path / "cohort", case)
    out = tmp_path / "out"
    args = ["evaluate", "--config", str(configs["tab"]), "--ckpt_path", str(best["tab"]),
            "--data.root", str(root), f"--evaluate.out={out}"]  # fmt: skip
    assert message in refused(capsys, args)
    assert not out.exists()


def with_other_clinical_columns(ckpt: Path, out: Path) -> Path:
    """The checkpoint as a model trained on other clinical columns would record it."""
    content = torch.load(ckpt, map_location="cpu", weights_only=True)
    content["lympho_mil"]["data"]["settings"]["clinical"] = ["age", "sex_male", "hemoglobin"]
    torch.save(content, out)
    return out


@pytest.mark.parametrize("case", ["image size", "clinical columns", "model class", "compared"])
def test_a_checkpoint_that_does_not_fit_is_one_line_with_nothing_written(
    configs: dict[str, Path],
    best: dict[str, Path],
    cohort: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    """Refused by predict's own check; a compared model refused after the first one
    predicted leaves nothing either."""
    out = tmp_path / "out"
    config, ckpt, extra = configs["tab"], best["tab"], []
    if case == "image size":
        extra, expected = ["--data.crops.image_size=16"], "data image_size 32 vs 16"
    elif case == "clinical columns":
        ckpt = with_other_clinical_columns(best["tab"], tmp_path / "other.ckpt")
        expected = "data clinical ['age', 'sex_male', 'hemoglobin'] vs"
    elif case == "model class":
        config, expected = configs["att"], "model TabularMLP vs AttentionMIL"
    else:
        extra, expected = [compare(configs["att"], best["tab"])], "model TabularMLP vs AttentionMIL"
    args = ["evaluate", "--config", str(config), "--ckpt_path", str(ckpt), "--data.root",
            str(cohort), f"--evaluate.out={out}", *extra]  # fmt: skip
    line = refused(capsys, args)
    assert expected in line and "does not fit the config" in line
    assert not out.exists()


def test_a_feature_encoder_that_does_not_fit_is_one_line(
    workdir: Path,
    train_root: Path,
    cohort: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A checkpoint trained on cached features of one frozen encoder, with the features of
    another (other initial weights) for the cohort: refused, not silently scored."""
    data = {"class_path": "CachedFeatureDataModule",
            "features": {"encoder": "small_cnn", "kwargs": {"width": 8}},
            "crops": {"image_size": 32}, "loader": {"batch_size": 4}}  # fmt: skip
    init = {"encoder": {"name": "identity", "in_dim": 128, "out_dim": 8}}  # small_cnn's features
    config = write_config(workdir / "features.yaml", "AttentionMIL", init, data)
    with contextlib.redirect_stdout(io.StringIO()):
        main(["fit", "--config", str(config), "--data.root", str(train_root),
              "--trainer.max_epochs=1"])  # fmt: skip
    (ckpt,) = sorted((workdir / "ckpt_features").glob("epoch*.ckpt"))
    out = tmp_path / "out"
    args = ["evaluate", "--config", str(config), "--ckpt_path", str(ckpt), "--data.root",
            str(cohort), f"--evaluate.out={out}", "--data.features.seed=1"]  # fmt: skip
    assert "data encoder_seed 0 vs 1" in refused(capsys, args)
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--evaluate.n_bootstrap=0"], "--evaluate.n_bootstrap must be an integer >= 1"),
        (['--evaluate.compare=[{"config": "x.yaml"}]'], "x.yaml needs its ckpt_path"),
    ],
)
def test_bad_options_are_one_line_before_any_work(
    configs: dict[str, Path],
    best: dict[str, Path],
    cohort: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "out"
    args = ["evaluate", "--config", str(configs["tab"]), "--ckpt_path", str(best["tab"]),
            "--data.root", str(cohort), f"--evaluate.out={out}", *extra]  # fmt: skip
    assert message in refused(capsys, args)
    assert not out.exists()
    no_ckpt = ["evaluate", "--config", str(configs["tab"]), "--data.root", str(cohort)]
    assert "evaluate needs --ckpt_path" in refused(capsys, no_ckpt)


# -- the bar on the real data --------------------------------------------------------------------
def half_cohort(dev: Path, ids: list[str], out: Path) -> Path:
    """A DLMI folder (2021 layout) of the patients ``ids`` of ``dev``: their clinical rows and
    links to their crop folders."""
    table = pd.read_csv(dev / "clinical_annotation.csv", index_col=0, dtype=str)
    (out / "trainset").mkdir(parents=True)
    table[table["ID"].isin(ids)].to_csv(out / "clinical_annotation.csv")
    for pid in ids:
        os.symlink((dev / "trainset" / pid).resolve(), out / "trainset" / pid)
    return out


@pytest.mark.shared_data
def test_dlmi_dev_fit_on_one_half_evaluate_on_the_other(shared_data: Path, tmp_path: Path) -> None:
    """dlmi-dev split into two halves by a seed: TabularMLP fitted on one (a few epochs),
    evaluated on the other, a folder of its own; every file is written, the figures match
    scikit-learn, a second run with the same seed gives identical numbers."""
    dev = shared_data / "dlmi-dev"
    if not dev.is_dir():
        pytest.skip(f"{dev} is absent")
    labels = labels_of(dev)
    fit_half, held_out = train_test_split(
        sorted(labels.index), test_size=0.5, stratify=labels.sort_index(), random_state=20
    )
    train, val = train_test_split(
        fit_half, test_size=0.25, stratify=labels[fit_half], random_state=0
    )
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tabular_mlp.yaml"
    with contextlib.redirect_stdout(io.StringIO()):
        main(["fit", "--config", str(config), "--data.root", str(dev),
              f"--data.split.train_ids={json.dumps(train)}",
              f"--data.split.val_ids={json.dumps(val)}",
              "--trainer.max_epochs=15", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path / 'run'}",
              f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])  # fmt: skip
    (ckpt,) = sorted((tmp_path / "ckpt").glob("epoch*.ckpt"))
    cohort = half_cohort(dev, held_out, tmp_path / "held_out")
    start = time.perf_counter()
    evaluate(config, ckpt, cohort, tmp_path / "first", "--evaluate.seed=7")
    seconds = time.perf_counter() - start
    evaluate(config, ckpt, cohort, tmp_path / "second", "--evaluate.seed=7")

    first = tmp_path / "first"
    assert {p.name for p in first.iterdir()} == {*EVALUATION_FILES, "predictions"}
    report = json.loads((first / "evaluation.json").read_text())
    assert report["n_patients"] == len(held_out) and report["n_unlabelled_left_out"] == 0
    assert report["models"]["tabular_mlp"]["n_in_sample"] == 0  # the other half only
    check_against_sklearn(first, report)
    for name in ("evaluation.json", "evaluation.md"):
        assert (tmp_path / "second" / name).read_text() == (first / name).read_text()
    assert seconds < 60  # the bar (30 s on cached features) is measured by the harness
