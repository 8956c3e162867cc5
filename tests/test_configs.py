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
def test_config_trains_one_step_on_synthetic_patients(
    config: Path, synthetic_dlmi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config as shipped (its model, data class, loss, optimiser and precision) on 32 px
    crops of a dozen synthetic patients, on the CPU, without loader workers; a config whose
    features read pretrained weights gets them from ``lympho-mil pretrain`` first (two short
    epochs)."""
    monkeypatch.chdir(tmp_path)  # where a config's relative weights path is written
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    if (data.get("features") or {}).get("weights"):
        pretrain = ["--pretrain.settings={epochs: 2, warmup_epochs: 0, batch_size: 16}"]
        main(["pretrain", "--config", str(config), f"--data.root={synthetic_dlmi}",
              ON_TINY_DATA[2], *pretrain])  # fmt: skip
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


def test_a_timm_vit_at_the_crop_size_trains_through_the_cli(synthetic_dlmi: Path) -> None:
    """Every encoder kwarg reaches timm: a ViT built for 224 px runs on 32 px crops."""
    attention = next(p for p in CONFIGS if p.stem == "attention_mil")
    encoder = "--model.encoder={name: vit_tiny_patch16_224, kwargs: {img_size: 32}}"
    args = ["--config", str(attention), f"--data.root={synthetic_dlmi}", *ON_TINY_DATA, encoder]
    cli = build_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss"])


def test_a_first_fit_says_what_it_decodes_and_extracts(tmp_path: Path) -> None:
    """dlmi.yaml on a new synthetic root, its output in a file (no terminal): plain lines
    name the decoding of the crops and the feature extraction, with counts."""
    import subprocess
    import sys

    from lympho_mil.data.synthetic import make_synthetic_dlmi

    root = make_synthetic_dlmi(tmp_path / "data", n_patients=12, image_size=32, seed=2)
    recipe = next(p for p in CONFIGS if p.stem == "dlmi")
    log = tmp_path / "fit.log"
    with log.open("w") as out:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lympho_mil",
                "fit",
                "--config",
                str(recipe),
                f"--data.root={root}",
                "--data.crops={image_size: 32, center_crop: null, "
                f"cache_dir: {tmp_path / 'cache'}}}",
                "--trainer.fast_dev_run=true",
                f"--trainer.default_root_dir={tmp_path / 'runs'}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            timeout=600,
        )
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    crops = len(list(root.rglob("*.jpg")))  # every patient's, labelled or not
    assert f"decoding crops into the cache: {crops}/{crops} crops" in text
    assert f"extracting morphology features: {crops}/{crops} crops" in text
