"""Shared fixtures: a tiny synthetic DLMI folder, isolated caches, the ``shared_data`` skip."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lympho_mil.data.synthetic import make_synthetic_dlmi

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``shared_data`` tests when ``../shared/data`` is absent."""
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED_DATA} is absent")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests using it carry the ``shared_data`` marker."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_dlmi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic DLMI folder (2024 layout, 12 patients, 32 px), shared: do not modify."""
    root = tmp_path_factory.mktemp("synthetic") / "dlmi"
    return make_synthetic_dlmi(root, n_patients=12, image_size=32, seed=0, max_cells=20)


@pytest.fixture
def dlmi_root(synthetic_dlmi: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`synthetic_dlmi` that a test may modify."""
    return Path(shutil.copytree(synthetic_dlmi, tmp_path / "dlmi"))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty image-cache folder private to the test."""
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lympho_mil_cache")


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """Code run in-process (benchmarks' ``main``, the CLI with loader workers) may set torch's
    thread count; later tests must not inherit it (a CPU reduction's summation order, hence
    bit-exact results, depends on it)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_default_cache(_session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes to the user's ``~/.cache``: the default cache lives in a temp folder."""
    monkeypatch.setenv("LYMPHO_MIL_CACHE", str(_session_cache))
