"""External validation: figures against an independent scikit-learn computation, the files,
bad input, and the page rendered by a headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from independent import sklearn_metrics

from lympho_mil.arguments import SettingError
from lympho_mil.data.errors import DataError
from lympho_mil.evaluation import external
from lympho_mil.evaluation.bootstrap import stratified_bootstrap_weights, weighted_referral
from lympho_mil.evaluation.external import (
    EVALUATION_FILES,
    ModelPredictions,
    evaluate_predictions,
)
from lympho_mil.evaluation.thresholds import best_balanced_accuracy_threshold
from lympho_mil.files import OutputExistsError

N_BOOT = 200


def cohort(seed: int = 0, n: int = 50) -> list[ModelPredictions]:
    """Two models on one cohort: rounded probabilities (ties), shuffled rows, 3 unlabelled."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.55).astype(int)
    label[:2] = [0, 1]
    ids = [f"P{i:03d}" for i in range(n)]
    models = []
    for name, signal, threshold in (("fusion", 0.35, 0.45), ("tabular", 0.2, 0.5)):
        prob = np.round(np.clip(signal * label + rng.random(n) * (1 - signal), 0, 1), 2)
        table = pd.DataFrame(
            {
                "id": ids,
                "label": np.where(np.arange(n) < n - 3, label, -1),
                "probability": prob,
                "threshold": threshold,
                "n_instances": rng.integers(1, 200, n),
            }
        ).sample(frac=1.0, random_state=seed)  # row order must not matter
        models.append(ModelPredictions(name, table, f"checkpoint {name}.ckpt"))
    return models


def labelled(model: ModelPredictions) -> tuple[np.ndarray, np.ndarray]:
    """label, probability of the labelled patients sorted by id (the bootstrap's order)."""
    table = model.table[model.table["label"] != -1].sort_values("id")
    return table["label"].to_numpy(), table["probability"].to_numpy()


def brute_force_referral(label: np.ndarray, prob: np.ndarray, target: float) -> dict[str, float]:
    """Try every probability as threshold, highest first; keep the first with recall >= target."""
    tumoral, reactive = prob[label == 1], prob[label == 0]
    for t in np.unique(prob)[::-1]:
        if (tumoral >= t).mean() >= target - 1e-12:
            return {
                "threshold": t,
                "skip_fraction": (prob < t).mean(),
                "sensitivity": (tumoral >= t).mean(),
                "specificity": (reactive < t).mean(),
            }
    raise AssertionError("unreachable: the lowest probability keeps every patient")


def independent(label: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Every figure of one model: metrics and both referral points, by scikit-learn."""
    out = sklearn_metrics(label, prob, threshold)
    for target in (0.95, 0.98):
        for name, value in brute_force_referral(label, prob, target).items():
            out[f"{target}:{name}"] = value
    return out


def reported(entry: dict, key: str) -> dict[str, float]:
    if ":" not in key:
        return entry["metrics"][key]
    target, name = key.split(":")
    point = next(r for r in entry["referral"] if r["target_sensitivity"] == float(target))
    return point[name]


def test_figures_match_an_independent_sklearn_computation(tmp_path: Path) -> None:
    models = cohort()
    report = evaluate_predictions(models, tmp_path / "out", n_bootstrap=N_BOOT, seed=3)
    label, _ = labelled(models[0])
    assert (report["n_patients"], report["n_unlabelled_left_out"]) == (47, 3)
    assert (report["n_tumoral"], report["n_reactive"]) == (label.sum(), (label == 0).sum())

    # the resamples: duplicated patients, each scored from scratch
    rows = [
        np.repeat(np.arange(len(label)), w) for w in stratified_bootstrap_weights(label, N_BOOT, 3)
    ]
    resampled = {}
    for model in models:
        label, prob = labelled(model)
        threshold = model.table["threshold"].iloc[0]
        entry = report["models"][model.name]
        assert entry["threshold"] == threshold
        assert entry["threshold_source"] == f"checkpoint {model.name}.ckpt"
        figures = [independent(label[r], prob[r], threshold) for r in rows]
        resampled[model.name] = figures
        for key, value in independent(label, prob, threshold).items():
            got = reported(entry, key)
            low, high = np.percentile([f[key] for f in figures], [2.5, 97.5])
            assert got["estimate"] == pytest.approx(value), key
            assert (got["ci95_low"], got["ci95_high"]) == pytest.approx((low, high)), key

    difference = report["comparison"]["differences"]["tabular"]
    for metric in ("balanced_accuracy", "auroc"):
        paired = [
            b[metric] - a[metric]
            for a, b in zip(resampled["fusion"], resampled["tabular"], strict=True)
        ]
        low, high = np.percentile(paired, [2.5, 97.5])
        assert (difference[metric]["ci95_low"], difference[metric]["ci95_high"]) == pytest.approx(
            (low, high)
        )
        assert difference[metric]["estimate"] == pytest.approx(
            report["models"]["tabular"]["metrics"][metric]["estimate"]
            - report["models"]["fusion"]["metrics"][metric]["estimate"]
        )


def test_referral_known_answer() -> None:
    label = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    prob = np.array([0.2, 0.6, 0.7, 0.8, 0.9, 0.1, 0.3, 0.4, 0.5, 0.65])
    ones = np.ones((1, 10))
    at_80 = {k: v[0] for k, v in weighted_referral(label, prob, 0.8, ones).items()}
    assert at_80 == pytest.approx(
        {"threshold": 0.6, "skip_fraction": 0.5, "sensitivity": 0.8, "specificity": 0.8}
    )
    at_95 = {k: v[0] for k, v in weighted_referral(label, prob, 0.95, ones).items()}
    assert at_95 == pytest.approx(
        {"threshold": 0.2, "skip_fraction": 0.1, "sensitivity": 1.0, "specificity": 0.2}
    )


def test_same_seed_same_numbers_and_every_file_written(tmp_path: Path) -> None:
    first = evaluate_predictions(cohort(), tmp_path / "a", n_bootstrap=N_BOOT, seed=1)
    evaluate_predictions(cohort(), tmp_path / "b", n_bootstrap=N_BOOT, seed=1)
    other = evaluate_predictions(cohort(), tmp_path / "c", n_bootstrap=N_BOOT, seed=2)
    text = (tmp_path / "a" / "evaluation.json").read_text()
    assert text == (tmp_path / "b" / "evaluation.json").read_text()
    assert json.loads(text) == first
    auroc = ("models", "fusion", "metrics", "auroc")
    a, c = first, other
    for key in auroc:
        a, c = a[key], c[key]
    assert a["estimate"] == c["estimate"] and a["ci95_low"] != c["ci95_low"]

    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(EVALUATION_FILES)
    for name in EVALUATION_FILES:
        if name.endswith(".png"):
            assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "a" / "evaluation.md").read_text()
    for heading in ("## Metrics", "## Referral", "## Paired differences to fusion"):
        assert heading in markdown
    page = (tmp_path / "a" / "report.html").read_text()
    assert page.count("<table>") == 5  # thresholds, metrics, referral, differences, patients
    assert page.count('src="data:image/png;base64,') == 4
    assert all(f"<td>{p['id']}</td>" in page for p in first["patients"])
    assert "<script" not in page and not re.search(r"(src|href)=\"(https?:)?//", page)


def test_refitted_threshold_is_reported(tmp_path: Path) -> None:
    models = cohort()
    report = evaluate_predictions(models, tmp_path / "out", refit_threshold=True, n_bootstrap=50)
    label, prob = labelled(models[0])
    entry = report["models"]["fusion"]
    assert entry["threshold"] == best_balanced_accuracy_threshold(prob, label.tolist())
    assert entry["threshold_source"].startswith("refitted on this cohort")
    assert (entry["model_threshold"], entry["model_threshold_source"]) == (
        0.45,
        "checkpoint fusion.ckpt",
    )
    assert "refitted on this cohort" in (tmp_path / "out" / "evaluation.md").read_text()


def test_montage_links_and_in_sample_marker(tmp_path: Path) -> None:
    models = cohort()
    montage = tmp_path / "predictions" / "montages" / "P 001.png"
    montage.parent.mkdir(parents=True)
    montage.write_bytes(b"png")
    table = models[0].table.assign(montage="", in_sample=False)
    table.loc[table["id"] == "P001", ["montage", "in_sample"]] = [str(montage), True]
    out = tmp_path / "reports" / "out"
    report = evaluate_predictions(
        [ModelPredictions("fusion", table), models[1]], out, n_bootstrap=20
    )
    patient = next(p for p in report["patients"] if p["id"] == "P001")["models"]
    assert patient["fusion"]["in_sample"] and not patient["tabular"]["in_sample"]
    assert (out / patient["fusion"]["montage"]).resolve() == montage.resolve()
    assert patient["tabular"]["montage"] is None
    assert report["models"]["fusion"]["n_in_sample"] == 1
    page = (out / "report.html").read_text()
    href = re.search(r'href="([^"]+)">montage<', page)
    assert href and (out / urllib.parse.unquote(href.group(1))).resolve() == montage.resolve()
    assert "&dagger;" in page and "fusion was trained on 1 of these patients" in page

    table.loc[table["id"] == "P001", "montage"] = str(tmp_path / "missing.png")
    with pytest.raises(DataError, match=r"P001: montage .* is not a file"):
        evaluate_predictions([ModelPredictions("fusion", table)], tmp_path / "x")


def edit(column: str, value: object, where: str | None = None):
    def change(table: pd.DataFrame) -> pd.DataFrame:
        table = table.copy()
        rows = table["id"] == where if where else slice(None)
        table.loc[rows, column] = value
        return table

    return change


BAD_TABLES = {  # the change, the error, whether both models have it (else the second only)
    "unlabelled": (edit("label", -1), "no labelled patient", True),
    "one class": (edit("label", 1), "every labelled patient is tumoral", True),
    "probability": (edit("probability", 1.5, "P004"), "P004 has probability 1.5", False),
    "missing value": (edit("probability", np.nan, "P004"), "P004 has probability nan", False),
    "two thresholds": (edit("threshold", 0.7, "P004"), "one threshold", False),
    "missing column": (lambda t: t.drop(columns="n_instances"), "n_instances.*missing", False),
    "twice": (lambda t: pd.concat([t, t.iloc[:1]]), "appears twice", False),
    "patient missing": (lambda t: t[t["id"] != "P004"], "different labelled patients", False),
    "other label": (edit("label", 0, "P001"), "P001 different labels", False),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_predictions_fail_cleanly_with_nothing_written(tmp_path: Path, case: str) -> None:
    change, message, both = BAD_TABLES[case]
    models = [
        ModelPredictions(m.name, change(m.table) if both or i else m.table)
        for i, m in enumerate(cohort())
    ]
    with pytest.raises(DataError, match=message):
        evaluate_predictions(models, tmp_path / "out", n_bootstrap=20)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"models": []}, "at least one model"),
        ({"models": [cohort()[0], cohort()[0]]}, "unique"),
        ({"n_bootstrap": 0}, "n_bootstrap"),
        ({"referral_sensitivities": (0.95, 0.0)}, "referral sensitivities"),
    ],
)
def test_bad_settings_fail_cleanly(tmp_path: Path, arguments: dict, message: str) -> None:
    with pytest.raises(SettingError, match=message):
        evaluate_predictions(**{"models": cohort(), "out_dir": tmp_path / "out", **arguments})
    assert list(tmp_path.iterdir()) == []


def test_earlier_outputs_are_kept_unless_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    evaluate_predictions(cohort(0), out, n_bootstrap=20)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match=r"evaluation\.json"):
        evaluate_predictions(cohort(1), out, n_bootstrap=20)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left

    monkeypatch.setattr(external, "evaluation_figures", lambda *args: {})  # no matplotlib
    (out / "notes.txt").write_text("mine")
    evaluate_predictions(cohort(1), out, n_bootstrap=20, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert names == {"evaluation.json", "evaluation.md", "report.html", "notes.txt"}
    assert "No figures" in (out / "report.html").read_text()


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("headless Chromium is not installed")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path: Path, chromium: str) -> None:
    from PIL import Image

    out = tmp_path / "out"
    report = evaluate_predictions(cohort(), out, n_bootstrap=50)
    page = (out / "report.html").as_uri()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert dom.count("<table>") == 5 and "Referral: who could skip flow cytometry" in dom
    assert all(p["id"] in dom for p in report["patients"])
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1200,2000", f"--screenshot={shot}", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50  # text, tables and figures, not a blank page
