"""Every script of ``examples/`` runs end to end on tiny data, as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TESTED = {"train_api.py", "predict_api.py", "bring_your_own_bags.py", "cross_validation.py"}

pytestmark = pytest.mark.slow


def run(script: str, *args: object, cwd: Path) -> str:
    """Run ``examples/<script>`` in a fresh interpreter; return its standard output."""
    env = {**os.environ, "LYMPHO_MIL_CACHE": str(cwd / "cache")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-4000:]}"
    return done.stdout


def test_every_example_script_is_tested() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} <= TESTED


def test_train_then_predict_from_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    printed = run("train_api.py", "--out", out, "--patients", 16, "--epochs", 1, cwd=tmp_path)
    assert re.search(r"test balanced accuracy \d\.\d{3}, AUROC", printed)
    trained = pd.read_csv(out / "predictions" / "predictions_detail.csv", dtype={"id": str})
    montages = sorted(p.stem for p in (out / "predictions" / "montages").glob("*.png"))
    assert montages == sorted(trained["id"]) and len(montages) > 0

    checkpoint = out / "checkpoints" / "best.ckpt"
    again = tmp_path / "again"
    args = ("--ckpt", checkpoint, "--root", out / "dlmi", "--size", 32, "--out", again)
    printed = run("predict_api.py", *args, cwd=tmp_path)
    reloaded = pd.read_csv(again / "predictions_detail.csv", dtype={"id": str})
    # the checkpoint alone (weights, clinical standardisation, threshold) gives the same answers
    pd.testing.assert_frame_equal(reloaded, trained, check_exact=False, rtol=1e-5)
    assert all(pid in printed for pid in trained["id"])
    assert (again / "explanations.md").is_file()


def test_bring_your_own_bags(tmp_path: Path) -> None:
    printed = run("bring_your_own_bags.py", "--bags", 40, "--epochs", 2, cwd=tmp_path)
    assert re.search(r"^40 bags, \d+ instances of 16 features$", printed, flags=re.M)
    auroc = re.search(r"witness instances \(held-out positive bags\): (\d\.\d+)", printed)
    assert auroc and 0.0 <= float(auroc.group(1)) <= 1.0


@pytest.mark.skipif(
    not (EXAMPLES / "cross_validation.py").is_file(), reason="no cross-validation example"
)
def test_cross_validation_example(tmp_path: Path) -> None:
    printed = run(
        "cross_validation.py",
        "--out",
        tmp_path / "cv",
        "--repeats",
        1,
        "--patients",
        24,
        cwd=tmp_path,
    )
    assert re.search(r"fusion - clinical: [+-]\d\.\d{3}", printed)
    assert (tmp_path / "cv" / "results" / "comparison.md").is_file()
