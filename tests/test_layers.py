"""The package's layers: every module imports alone (no import cycle), and imports only point
down: cli -> evaluation -> models -> features -> data and nn, which import neither each other
nor anything above (``arguments``, ``dihedral``, ``files``, ``progress``, ``version`` below
every layer)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lympho_mil"
BELOW = {
    "nn": set(),
    "data": set(),
    "features": {"nn", "data"},
    "models": {"nn", "data", "features"},
    "evaluation": {"nn", "data", "features", "models"},
    "cli": {"nn", "data", "features", "models", "evaluation"},
}
"""The layers each layer may import besides its own: ``nn`` (pure torch) and ``data`` know
nothing of each other, nor of any model."""
BOTTOM = {"arguments", "dihedral", "files", "progress", "version"}  # every layer may use them


def modules() -> list[str]:
    """Every module of the package but ``__main__`` (importing it runs the command)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.stem == "__main__":
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported(path: Path) -> set[str]:
    """Every ``lympho_mil`` module that ``path`` imports, at module level or inside a
    function (a deferred import hides a cycle, it does not remove it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "lympho_mil"}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Each module first, in an interpreter where no other module of the package is loaded
    (third-party packages stay loaded between them, to keep it fast)."""
    code = (
        "import importlib, sys, traceback\n"
        f"for name in {modules()!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'lympho_mil']:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        print(f'FAILED {name}:', traceback.format_exc().splitlines()[-1])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FAILED" not in done.stdout, done.stdout


def test_imports_point_down_and_nothing_below_imports_the_command_layer() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if own not in BELOW:
            continue  # the package root and its entry points sit above every layer
        for target in imported(path):
            other = layer(target)
            if other in BOTTOM or other == own:
                continue
            if other not in BELOW[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {target}")
    assert not wrong, wrong


def test_the_layer_check_sees_a_deferred_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lympho_mil.cli.app import build_cli\n")
    assert imported(module) == {"lympho_mil.cli.app"}
