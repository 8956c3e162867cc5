"""Several processes on one data root and one cache folder: each cache is built once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lympho_mil.data.synthetic import make_synthetic_dlmi

REPO = Path(__file__).resolve().parents[1]

RECORDING_CLI = """
import os, sys, time
from contextlib import contextmanager
from pathlib import Path
import lympho_mil.features.cache as feature_cache
import lympho_mil.data.image_cache as image_cache

folder = Path(sys.argv[1])
decode, lock = image_cache._decode_into, image_cache.cache_lock
extract = feature_cache.extract_features

def record(what):
    with (folder / "builds.txt").open("a") as handle:
        handle.write(what + "\\n")

@contextmanager
def announced_lock(path):
    (folder / f"locking-{os.getpid()}").touch()
    with lock(path):
        yield

def decode_once_the_other_process_waits(*args, **kwargs):
    record("crops")
    deadline = time.time() + 120
    while not any(p.name != f"locking-{os.getpid()}" for p in folder.glob("locking-*")):
        if time.time() > deadline:
            break
        time.sleep(0.1)
    time.sleep(1)  # the other process is at the lock now
    return decode(*args, **kwargs)

def recorded_extract(*args, **kwargs):
    record("features")
    return extract(*args, **kwargs)

image_cache.cache_lock = announced_lock
image_cache._decode_into = decode_once_the_other_process_waits
feature_cache.extract_features = recorded_extract
from lympho_mil.cli import main
main(sys.argv[2:])
"""


def start(script: Path, args: list[str]) -> subprocess.Popen:
    """``lympho-mil ARGS`` in a subprocess that records every cache build into
    ``builds.txt`` beside ``script``; a build waits for another process at the cache's lock."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(script.parent), *args],
        cwd=script.parent,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    """Wait for ``process``; its stderr (asserting exit status 0)."""
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return err


@pytest.mark.slow
@pytest.mark.parametrize("second", ["fit", "cv"])
def test_two_processes_on_one_cache_folder_build_each_cache_once(
    tmp_path: Path, second: str
) -> None:
    """dlmi.yaml as shipped on a new root and an empty cache folder: a fit, and a fit or a cv
    started while the first decodes the crops; both succeed, each cache is built once, and a
    third run reuses both without a rebuild or a corruption warning."""
    root = make_synthetic_dlmi(
        tmp_path / "root", n_patients=20, image_size=32, min_cells=4, max_cells=12
    )
    script = tmp_path / "recording_cli.py"
    script.write_text(RECORDING_CLI)
    shared = [
        "--config",
        str(REPO / "examples/configs/dlmi.yaml"),
        f"--data.root={root}",
        f"--data.crops.cache_dir={tmp_path / 'cache'}",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
    ]

    def fit(name: str) -> list[str]:
        return ["fit", *shared, f"--trainer.default_root_dir={tmp_path / name}"]

    cv = ["cv", *shared, "--cv.folds=2", f"--cv.out={tmp_path / 'cv'}", "--cv.n_bootstrap=10"]
    first = start(script, fit("first"))
    other = start(script, fit("second") if second == "fit" else cv)
    errors = finish(first) + finish(other)
    builds = tmp_path / "builds.txt"
    assert sorted(builds.read_text().split()) == ["crops", "features"]
    assert "waiting for another process to finish building" in errors
    assert (tmp_path / ("second" if second == "fit" else "cv/cv_report.json")).exists()

    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    stamps = {name: (tmp_path / "cache" / name).stat().st_mtime_ns for name in cache}
    third = finish(start(script, fit("third")))
    assert sorted(builds.read_text().split()) == ["crops", "features"]  # nothing rebuilt
    assert "corrupted" not in third
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stamps
    assert [name for name in cache if ".tmp" in name] == []  # no build left behind
