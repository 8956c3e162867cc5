"""Every shipped config parses through the real CLI (``--print_config``) with its model class."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lympho_mil.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


def test_there_is_a_config_per_model_family() -> None:
    classes = {yaml.safe_load(p.read_text())["model"]["class_path"] for p in CONFIGS}
    expected = {
        "AttentionMIL",
        "GatedAttentionMIL",
        "MeanPoolMIL",
        "MaxPoolMIL",
        "InstanceMIL",
        "TabularMLP",
        "GatedFusionMIL",
    }
    assert expected <= classes


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    declared = yaml.safe_load(config.read_text())["model"]["class_path"]
    assert printed["model"]["class_path"].endswith(declared)
