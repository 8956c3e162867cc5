"""Importing lympho-mil is light: heavy dependencies load when they are used."""

from __future__ import annotations

import subprocess
import sys

import lympho_mil


def loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after ``statement``."""
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_pure_torch_layer_loads_no_lightning() -> None:
    heavy = ("lightning", "albumentations", "matplotlib", "cv2", "pandas", "timm")
    assert loaded_after("import lympho_mil.nn", heavy) == []


def test_the_package_loads_its_names_on_first_use() -> None:
    heavy = ("lightning", "albumentations", "matplotlib", "cv2")
    assert loaded_after("import lympho_mil", heavy) == []
    assert loaded_after("from lympho_mil import PatientBagDataModule", ("albumentations",)) == []
    assert "AttentionMIL" in dir(lympho_mil)
    from lympho_mil.models import AttentionMIL

    assert lympho_mil.AttentionMIL is AttentionMIL
    try:
        lympho_mil.NoSuchModel  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchModel" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
