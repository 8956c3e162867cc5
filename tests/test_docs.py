"""The documentation site builds in strict mode and its API reference covers the public API."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import lympho_mil

ROOT = Path(__file__).resolve().parents[1]


def public_modules() -> list[ModuleType]:
    """``lympho_mil`` and each of its subpackages that declares ``__all__``."""
    packages = [
        importlib.import_module(f"lympho_mil.{info.name}")
        for info in pkgutil.iter_modules(lympho_mil.__path__)
        if info.ispkg
    ]
    return [lympho_mil, *(p for p in packages if hasattr(p, "__all__"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for plugin in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(plugin, reason="the docs extra is not installed")
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr[-4000:]}"
    return out


@pytest.mark.slow
def test_every_public_name_is_in_the_api_reference(site: Path) -> None:
    html = "".join(p.read_text(encoding="utf-8") for p in (site / "api").rglob("*.html"))
    anchors = set(re.findall(r'id="([^"]+)"', html))
    modules = public_modules()
    assert {m.__name__ for m in modules} >= {"lympho_mil", "lympho_mil.data", "lympho_mil.nn"}
    missing = [
        f"{m.__name__}.{name}"
        for m in modules
        for name in m.__all__
        if f"{m.__name__}.{name}" not in anchors
    ]
    assert not missing, f"public names missing from the API reference: {missing}"


@pytest.mark.slow
def test_every_page_is_built(site: Path) -> None:
    pages = [p.relative_to(ROOT / "docs") for p in (ROOT / "docs").rglob("*.md")]
    built = [site / p.parent / ("" if p.stem == "index" else p.stem) / "index.html" for p in pages]
    assert [str(p) for p in built if not p.is_file()] == []


def test_getting_started_gives_the_readme_quickstart() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quickstart, flags=re.S)
    assert len(commands) == 2
    page = (ROOT / "docs" / "getting_started.md").read_text(encoding="utf-8")
    for command in commands:
        assert command in page
