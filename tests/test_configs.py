"""Every shipped config parses through the real CLI (``--print_config``) with its model class,
and trains one step on tiny synthetic patients (torchgeo's pattern); every public model and
datamodule takes at most 12 constructor parameters."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

import lympho_mil.features  # noqa: F401  (registers CachedFeatureDataModule)
from lympho_mil.cli import main
from lympho_mil.cli.app import build_cli, class_choices
from lympho_mil.data import BagDataModule
from lympho_mil.models import BagClassifier

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))
MAX_PARAMETERS = 12
ON_TINY_DATA = [
    "--trainer.fast_dev_run=true",  # one training and one validation batch
    "--trainer.accelerator=cpu",
    "--data.crops={image_size: 32, center_crop: null}",  # the synthetic crops as they are
    "--data.loader.num_workers=0",
    "--data.max_instances=4",
]


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


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_one_step_on_synthetic_patients(config: Path, synthetic_dlmi: Path) -> None:
    """The config as shipped (its model, data class, loss, optimiser and precision) on 32 px
    crops of a dozen synthetic patients, on the CPU, without loader workers."""
    args = ["--config", str(config), f"--data.root={synthetic_dlmi}", *ON_TINY_DATA]
    cli = build_cli(args, run=False)
    before = [p.detach().clone() for p in cli.model.parameters() if p.requires_grad]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss"])
    after = [p for p in cli.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def constructor_parameters(cls: type) -> list[str]:
    """The constructor parameters of ``cls`` as the CLI lists them (``--print_config``):
    inherited ones included, through ``**kwargs``."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init")
    return list(vars(parser.get_defaults()["init"]))


@pytest.mark.parametrize(
    "cls",
    [*class_choices(BagClassifier).values(), *class_choices(BagDataModule).values()],
    ids=lambda cls: cls.__name__,
)
def test_public_models_and_datamodules_take_at_most_a_dozen_parameters(cls: type) -> None:
    names = constructor_parameters(cls)
    assert set(inspect.signature(cls).parameters) - {"kwargs"} <= set(names)  # what it counts
    assert len(names) <= MAX_PARAMETERS, f"{cls.__name__}: {len(names)} parameters {names}"
