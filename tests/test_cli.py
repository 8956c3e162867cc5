"""The real CLI on tiny synthetic data: fit -> test -> predict, overrides, bad configs."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from trainers import cli_trainer, quiet_trainer

from lympho_mil import PatientBagDataModule, TabularMLP, __version__
from lympho_mil.cli import main
from lympho_mil.data import CropSettings, SplitSettings
from lympho_mil.data.synthetic import make_synthetic_dlmi
from lympho_mil.evaluation.thresholds import best_balanced_accuracy_threshold


@pytest.fixture(scope="module")
def dlmi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "dlmi"
    return make_synthetic_dlmi(root, n_patients=16, image_size=32, seed=1, max_cells=18)


def write_config(path: Path, root: Path, cache: Path, model: str = "AttentionMIL") -> Path:
    config = {
        "seed_everything": 0,
        "trainer": cli_trainer(
            path.parent,
            max_epochs=2,
            logger={
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(path.parent / "logs")},
            },
        ),
        "model": {
            "class_path": model,
            "init_args": {"encoder": {"name": "small_cnn", "kwargs": {"width": 8}, "out_dim": 16}},
        },
        "data": {
            "class_path": "PatientBagDataModule",
            "init_args": {
                "root": str(root),
                "crops": {"image_size": 32, "cache_dir": str(cache)},
                "loader": {"batch_size": 4},
                "max_instances": 8,
                "split": {"test_fraction": 0.25},
            },
        },
        "checkpoint": {"dirpath": str(path.parent / "ckpt")},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_test_predict_from_checkpoint(dlmi_root: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    main(["fit", "--config", str(config)])
    best = sorted((tmp_path / "ckpt").glob("epoch*.ckpt"))
    assert best and (tmp_path / "ckpt" / "last.ckpt").is_file()

    main(["test", "--config", str(config), "--ckpt_path", str(best[0])])
    metrics = pd.read_csv(sorted((tmp_path / "logs").rglob("metrics.csv"))[-1])
    assert 0.0 <= metrics["test_balanced_accuracy"].dropna().iloc[-1] <= 1.0

    out = tmp_path / "pred"
    predict = [
        "predict",
        "--config",
        str(config),
        "--ckpt_path",
        str(best[0]),
        "--prediction.output_dir",
        str(out),
    ]
    main(predict)
    submission = pd.read_csv(out / "predictions.csv")
    detail = pd.read_csv(out / "predictions_detail.csv")
    attention = pd.read_csv(out / "attention.csv")
    unlabelled = pd.read_csv(dlmi_root / "testset" / "testset_data.csv")["ID"]
    assert list(submission.columns) == ["Id", "Predicted"]
    assert sorted(submission["Id"]) == sorted(unlabelled)  # every test patient once
    assert set(submission["Predicted"]) <= {0, 1}
    assert detail["probability"].between(0, 1).all()
    assert (detail["predicted"] == (detail["probability"] >= detail["threshold"])).all()
    sums = attention.groupby("id")["weight"].sum()
    assert sorted(sums.index) == sorted(unlabelled)
    assert sums.to_numpy() == pytest.approx(1.0, abs=1e-5)
    counts = attention.groupby("id").size()
    assert (counts.sort_index() == detail.set_index("id")["n_instances"].sort_index()).all()

    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(SystemExit) as exc:  # existing files are never overwritten silently
        main(predict)
    assert exc.value.code == 2
    assert not (tmp_path / "cache").exists()  # refused before decoding a single crop
    main([*predict, "--prediction.overwrite", "true"])

    # new patients alone (no labelled ones to split): the checkpoint brings everything
    cohort = new_cohort(dlmi_root, tmp_path / "cohort")
    elsewhere = tmp_path / "pred_cohort"
    main([*predict[:-1], str(elsewhere), "--data.root", str(cohort)])
    again = pd.read_csv(elsewhere / "predictions_detail.csv").set_index("id")
    first = detail.set_index("id").loc[again.index]
    assert again["probability"].to_numpy() == pytest.approx(first["probability"].to_numpy())

    for subcommand in ("validate", "test", "predict"):  # never untrained weights
        with pytest.raises(SystemExit) as exc:
            main([subcommand, "--config", str(config)])
        assert exc.value.code == 2


def new_cohort(root: Path, out: Path) -> Path:
    """A DLMI folder with only the unlabelled patients of ``root`` (testset/)."""
    shutil.copytree(root / "testset", out / "testset")
    return out


def test_checkpoint_carries_standardisation_and_threshold(dlmi_root: Path, tmp_path: Path) -> None:
    """A model that reads the clinical vector carries its standardisation (in its network)."""
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache", "GatedFusionMIL")
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    stats = ckpt["hyper_parameters"]["tabular_stats"]
    assert state["net.standardize.mean"].tolist() == pytest.approx(stats["mean"])
    assert state["net.standardize.scale"].tolist() == pytest.approx(stats["scale"])
    assert float(state["threshold"]) == pytest.approx(0.5)
    assert len(stats["mean"]) == 3


def test_evaluation_settings_on_the_command_line_win_over_the_checkpoint(
    dlmi_root: Path, tmp_path: Path
) -> None:
    """LightningCLI takes every model argument from --ckpt_path; threshold and test-time
    views asked on the command line must still apply."""
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    base = ["predict", "--config", str(config), "--ckpt_path", ckpt]
    main([*base, "--prediction.output_dir", str(tmp_path / "plain")])
    asked = ["--model.threshold", "0.3", "--model.init_args.tta_views=8"]
    main([*base, *asked, "--prediction.output_dir", str(tmp_path / "asked")])
    plain = pd.read_csv(tmp_path / "plain" / "predictions_detail.csv").set_index("id")
    asked_df = pd.read_csv(tmp_path / "asked" / "predictions_detail.csv").set_index("id")
    assert plain["threshold"].tolist() == pytest.approx([0.5] * len(plain))
    assert asked_df["threshold"].tolist() == pytest.approx([0.3] * len(asked_df))
    difference = (asked_df["probability"] - plain.loc[asked_df.index, "probability"]).abs()
    assert difference.max() > 1e-4  # the 8 views changed the probabilities

    # a checkpoint whose threshold was chosen later (as cv does): kept unless one is asked,
    # even the value of the setting it was trained with
    content = torch.load(ckpt, map_location="cpu", weights_only=True)
    content["state_dict"]["threshold"] = torch.tensor(0.42)
    chosen = tmp_path / "chosen.ckpt"
    torch.save(content, chosen)
    base = ["predict", "--config", str(config), "--ckpt_path", str(chosen)]
    for asked_args, expected in (([], 0.42), (["--model.threshold", "0.5"], 0.5)):
        out = tmp_path / f"chosen{len(asked_args)}"
        main([*base, *asked_args, "--prediction.output_dir", str(out)])
        thresholds = pd.read_csv(out / "predictions_detail.csv")["threshold"]
        assert thresholds.tolist() == pytest.approx([expected] * len(thresholds))


def test_default_root_dir_moves_the_runs_folder(
    dlmi_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    content = yaml.safe_load(config.read_text())
    del content["trainer"]["logger"], content["trainer"]["default_root_dir"]
    del content["checkpoint"]  # the defaults: ./runs
    config.write_text(yaml.safe_dump(content))
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    fit = ["fit", "--config", str(config), "--trainer.max_epochs", "1"]
    main(fit)
    main([*fit, "--trainer.default_root_dir", str(root)])
    assert (tmp_path / "runs" / "lightning_logs" / "version_0" / "metrics.csv").is_file()
    assert not (tmp_path / "runs" / "lightning_logs" / "version_1").exists()
    assert list((root / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*.ckpt"))


def test_ckpt_path_last_in_a_checkpoint_folder_without_one_is_an_error(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")  # dirpath set
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert exc.value.code == 2 and "no last.ckpt in" in capsys.readouterr().err


def test_resume_from_last_checkpoint(dlmi_root: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    last = tmp_path / "ckpt" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)
    main(["fit", "--config", str(config), "--ckpt_path", str(last)])  # max_epochs 2: one more
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 2 * first["global_step"] > 0


def test_data_root_and_model_from_the_command_line(dlmi_root: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "not-here", tmp_path / "cache")
    main(
        [
            "fit",
            "--config",
            str(config),
            "--data.root",
            str(dlmi_root),
            "--model",
            "GatedFusionMIL",
            "--model.fusion.kind",
            "concat",
            "--trainer.max_epochs",
            "1",
        ]
    )
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("net.fusion.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["fusion"]["kind"] == "concat"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model", "NoSuchMIL"], "unknown model 'NoSuchMIL'; valid choices: AttentionMIL"),
        (["--data", "NoSuchData"], "unknown data 'NoSuchData'; valid choices:"),
        (["--model.no_such_key", "3"], "no_such_key"),
        (["--data.loader.batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["--model.optim.lr", "0"], "lr must be > 0, got 0"),
        (
            ["--data.augment.cache_on_device", "true"],
            "cache_on_device=True needs augment mode 'gpu'",
        ),
        (
            ["--data.root", "/no/such/folder"],
            "/no/such/folder does not exist or is not a folder (a relative",
        ),
        (["--data.max_instance", "32"], "data.max_instance; did you mean data.max_instances?"),
        (["--trainer.max_epoch", "5"], "did you mean --trainer.max_epochs?"),  # no abbreviation
        (["--model.init_args.pos_wieght", "2"], "did you mean model.pos_weight?"),
        (["--model.pos_weight", "x"], "invalid value x for model.pos_weight"),
        (["--model.encoder.weights", "null"], "as a mapping: --model.encoder '{weights: null}'"),
    ],
)
def test_bad_configuration_is_a_short_message(
    dlmi_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    expected: str,
) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 5 and "usage:" not in err


def test_an_unreadable_config_is_a_short_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tabs.yaml"
    config.write_text("model:\n\tclass_path: AttentionMIL\n")  # YAML forbids tab indentation
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot read config {config}" in err and "Traceback" not in err


def test_ckpt_path_last_resumes_the_newest_run(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each run logs into a new version folder: ``last`` must find the previous one's."""
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    content = yaml.safe_load(config.read_text())
    del content["checkpoint"]  # the default: checkpoints inside each run's version folder
    config.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit) as exc:  # nothing to resume yet: an error, not a fresh start
        main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert exc.value.code == 2 and "no last.ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # not the untrained weights of the config
        main(["test", "--config", str(config), "--ckpt_path", "last"])
    assert exc.value.code == 2 and "no last.ckpt" in capsys.readouterr().err
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    resumed = pd.read_csv(tmp_path / "logs" / "lightning_logs" / "version_1" / "metrics.csv")
    epochs = set(resumed["epoch"].dropna().astype(int))
    assert 1 in epochs and 0 not in epochs  # epoch 0 was the first run's
    # the resumed run went on writing into the checkpoint folder of the run it resumed
    assert not (tmp_path / "logs" / "lightning_logs" / "version_1" / "checkpoints").exists()
    # predict reads ``last`` alike: the newest last.ckpt
    newest = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(newest, map_location="cpu", weights_only=True)["epoch"] == 1
    for ckpt, out in (("last", "from_last"), (str(newest), "from_path")):
        predict = ["predict", "--config", str(config), "--ckpt_path", ckpt]
        main([*predict, "--prediction.output_dir", str(tmp_path / out)])
    from_last, from_path = (
        pd.read_csv(tmp_path / out / "predictions_detail.csv") for out in ("from_last", "from_path")
    )
    assert from_last["probability"].tolist() == from_path["probability"].tolist()


def test_ckpt_path_last_is_the_newest_of_several_runs(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    content = yaml.safe_load(config.read_text())
    del content["checkpoint"]  # each run keeps its checkpoints in its own version folder
    config.write_text(yaml.safe_dump(content))
    for epochs in ("1", "2"):  # two independent runs: version_0, then version_1
        main(["fit", "--config", str(config), "--trainer.max_epochs", epochs])
    runs = tmp_path / "logs" / "lightning_logs"
    outputs = []
    for ckpt in (
        "last",
        *(str(runs / v / "checkpoints" / "last.ckpt") for v in ("version_0", "version_1")),
    ):
        out = tmp_path / f"pred{len(outputs)}"
        main(
            [
                "predict",
                "--config",
                str(config),
                "--ckpt_path",
                ckpt,
                "--prediction.output_dir",
                str(out),
            ]
        )
        outputs.append(pd.read_csv(out / "predictions_detail.csv")["probability"].tolist())
    assert outputs[0] == outputs[2] != outputs[1]
    with pytest.raises(SystemExit) as exc:  # its weights would load into a MaxPoolMIL unnoticed
        main(["predict", "--config", str(config), "--ckpt_path", "last", "--model", "MaxPoolMIL"])
    assert exc.value.code == 2 and "comes from a AttentionMIL run" in capsys.readouterr().err


def test_ckpt_path_best_takes_the_best_checkpoint_the_newest_run_recorded(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    content = yaml.safe_load(config.read_text())
    content["checkpoint"] = {"monitor": "step", "mode": "min"}  # epoch 0 is the best
    config.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--config", str(config), "--ckpt_path", "best"])
    assert exc.value.code == 2 and "no last.ckpt" in capsys.readouterr().err
    main(["fit", "--config", str(config)])
    best = capsys.readouterr().out.split("best checkpoint: ")[1].split()[0]
    assert Path(best).name.startswith("epoch000")
    outputs = {}
    for ckpt in ("best", best, "last"):
        out = tmp_path / f"pred{len(outputs)}"
        predict = ["predict", "--config", str(config), "--ckpt_path", ckpt]
        main([*predict, "--prediction.output_dir", str(out)])
        outputs[ckpt] = pd.read_csv(out / "predictions_detail.csv")["probability"].tolist()
    assert outputs["best"] == outputs[best] != outputs["last"]
    with pytest.raises(SystemExit) as exc:  # resuming from the best is not a resume
        main(["fit", "--config", str(config), "--ckpt_path", "best"])
    assert exc.value.code == 2 and "fit --ckpt_path best" in capsys.readouterr().err


def test_main_help_names_cv(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "lympho-mil cv --help" in capsys.readouterr().out


def test_one_command_lists_its_subcommands_with_its_own_words(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Lightning Trainer command line tool" not in out and "lympho-mil:" in out
    listed = dict(re.findall(r"^    (\w+) +(\S.*)$", out, flags=re.M))
    assert set(listed) == {
        *("fit", "validate", "test", "predict", "cv", "bag", "evaluate", "pretrain")
    }
    assert listed["cv"].startswith("cross-validate fit configs")
    assert listed["bag"].startswith("fit the bag that cv --cv.inner_folds measures")
    assert listed["evaluate"].startswith("score checkpoints on another labelled cohort")
    assert listed["pretrain"].startswith("pretrain a config's crop encoder with SimCLR")
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"lympho-mil {__version__}"
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'best' is refused (resume from last)" in help_text  # lympho-mil's rule, not Lightning's
    offered = set(re.findall(r"lympho_mil(?:\.data)?\.(\w+)[,)]", help_text))
    assert {"AttentionMIL", "TabularMLP", "PatientBagDataModule"} <= offered
    assert not {"BagClassifier", "MILClassifier", "BagDataModule"} & offered


def test_the_printed_config_names_the_version(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert capsys.readouterr().out.startswith(f"# lympho-mil=={__version__}\n")


def test_an_unknown_key_in_a_config_file_is_named(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    content = yaml.safe_load(config.read_text())
    content["model"]["init_args"]["pos_wieght"] = 2
    config.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown option model.pos_wieght" in err
    assert "did you mean model.pos_weight?" in err and len(err.strip().splitlines()) <= 5


def test_weights_that_do_not_fit_the_model_are_a_user_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """E.g. a checkpoint used with data of another clinical size: the datamodule's links build
    the model, and the weights no longer fit."""
    import lympho_mil.cli as cli

    def mismatch(args: object, run: bool = True) -> None:
        torch.nn.Linear(3, 2).load_state_dict(torch.nn.Linear(4, 2).state_dict())

    monkeypatch.setattr(cli, "build_cli", mismatch)
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--config", "x.yaml"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "do not fit the model" in err and "size mismatch" in err
    monkeypatch.setattr(cli, "build_cli", lambda args, run=True: torch.zeros(2) @ torch.zeros(3))
    with pytest.raises(RuntimeError):  # any other RuntimeError stays a traceback (a bug)
        main(["predict", "--config", "x.yaml"])


def test_an_encoder_weights_file_that_does_not_fit_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """E.g. ``--data.features.weights`` of a CachedFeatureDataModule, loaded in ``fit`` without
    any checkpoint: the error names the file, not a checkpoint."""
    import lympho_mil.cli as cli
    from lympho_mil.nn import build_instance_encoder

    path = tmp_path / "encoder.pt"
    torch.save(build_instance_encoder("small_cnn", width=4, out_dim=8).state_dict(), path)

    def load(args: object, run: bool = True) -> None:
        build_instance_encoder("small_cnn", weights_path=str(path), width=8, out_dim=8)

    monkeypatch.setattr(cli, "build_cli", load)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "x.yaml"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"weights in {path} do not fit" in err
    assert "checkpoint's weights" not in err


def test_a_models_encoder_weights_that_do_not_fit_are_one_line(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model's own ``encoder_weights`` fail while LightningCLI instantiates it, which
    wraps the error: the user still sees one line naming the file, not a traceback."""
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(2)}, bad)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--model.init_args.encoder.weights", str(bad)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"weights in {bad} do not fit" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_run_folder_is_never_overwritten(dlmi_root: Path, tmp_path: Path) -> None:
    """A config that names its log folder (as each ``cv`` fold's does): predicting with it
    leaves that run's config.yaml and metrics.csv alone; and the metrics hold the trained
    epochs only (not the best checkpoint's final validation as a third)."""
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    content = yaml.safe_load(config.read_text())
    content["trainer"]["logger"]["init_args"].update(name="", version="")
    config.write_text(yaml.safe_dump(content))
    main(["fit", "--config", str(config)])
    run = tmp_path / "logs"
    metrics = pd.read_csv(run / "metrics.csv")
    assert set(metrics["epoch"].dropna().astype(int)) == {0, 1}
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.csv")}
    best = sorted((tmp_path / "ckpt").glob("epoch*.ckpt"))[0]
    predict = ["predict", "--config", str(config), "--ckpt_path", str(best)]
    main([*predict, "--prediction.output_dir", str(tmp_path / "pred")])
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / "version_0").exists()  # predict logs nothing: no log folder of its own


def test_without_a_logger_last_resumes_and_no_config_lands_in_the_working_directory(
    dlmi_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path / "config.yaml", dlmi_root, tmp_path / "cache")
    content = yaml.safe_load(config.read_text())
    del content["checkpoint"]  # the default: default_root_dir/checkpoints without a logger
    config.write_text("# the user's own file\n" + yaml.safe_dump(content))
    mine = config.read_text()
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(config), "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as exc:  # nothing to resume: not a silent fresh start
        main([*fit, "--ckpt_path", "last"])
    assert exc.value.code == 2 and "last.ckpt" in capsys.readouterr().err
    main([*fit, "--trainer.max_epochs", "1"])
    assert config.read_text() == mine  # Lightning would save its config over it
    last = tmp_path / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    main([*fit, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2 * first


def test_a_resumed_run_keeps_the_best_checkpoint_of_all_epochs(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Monitoring the step, lowest first: epoch 0 is the best whatever comes after; a resume
    logging into a new version folder used to forget its score and crown the next epoch."""
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    content = yaml.safe_load(config.read_text())
    content["checkpoint"] = {"monitor": "step", "mode": "min"}  # checkpoints in each run's folder
    config.write_text(yaml.safe_dump(content))
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    capsys.readouterr()
    first_run = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints"
    for path in first_run.iterdir():  # a coarse clock: best and last written in one tick
        os.utime(path, ns=(10**18, 10**18))
    main(["fit", "--config", str(config), "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    best = capsys.readouterr().out.split("best checkpoint: ")[1].split()[0]
    assert Path(best).name.startswith("epoch000")
    kept = sorted(p.name for p in (tmp_path / "logs").rglob("epoch*.ckpt"))
    assert len(kept) == 1 and kept[0].startswith("epoch000")
    # a branch from that older checkpoint, or from a copy elsewhere under any name, leaves
    # the run's latest state alone
    latest = (first_run / "last.ckpt").read_bytes()
    copy = tmp_path / "elsewhere" / "model.pt"
    copy.parent.mkdir()
    shutil.copy(first_run / "last.ckpt", copy)
    for ckpt in (best, str(copy)):
        main(["fit", "--config", str(config), "--trainer.max_epochs", "4", "--ckpt_path", ckpt])
        assert (first_run / "last.ckpt").read_bytes() == latest
    versions = tmp_path / "logs" / "lightning_logs"
    assert (versions / "version_2" / "checkpoints" / "last.ckpt").is_file()
    assert (versions / "version_3" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("content", [b"hello\n", b"\x80\x04garbage", None])
def test_a_file_that_is_not_a_checkpoint_is_one_line(
    dlmi_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes | None,
) -> None:
    config = write_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache")
    path = tmp_path / "not.ckpt"
    if content is None:
        torch.save({"a": 1}, path)  # a torch file, not a Lightning checkpoint
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--config", str(config), "--ckpt_path", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(path) in err and "not a" in err
    assert "Traceback" not in err


def runs_config(path: Path, root: Path, cache: Path, model: str = "AttentionMIL") -> Path:
    """`write_config` with each run's checkpoints in its own version folder."""
    config = write_config(path, root, cache, model)
    content = yaml.safe_load(config.read_text())
    del content["checkpoint"]
    if model == "TabularMLP":
        content["model"]["init_args"] = {}
    config.write_text(yaml.safe_dump(content))
    return config


def predicted(config: Path, ckpt: str, out: Path, *extra: str) -> pd.DataFrame:
    main(["predict", "--config", str(config), "--ckpt_path", ckpt, "--prediction.output_dir",
          str(out), *extra])  # fmt: skip
    return pd.read_csv(out / "predictions_detail.csv").set_index("id")


def test_best_is_the_newest_run_of_the_configs_model_and_data(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A newer run of another model in the same runs folder is skipped, with a line saying
    which checkpoint is used; a config that no run fits is refused, naming the runs."""
    attention = runs_config(tmp_path / "attention.yaml", dlmi_root, tmp_path / "cache")
    tabular = runs_config(tmp_path / "tabular.yaml", dlmi_root, tmp_path / "cache", "TabularMLP")
    main(["fit", "--config", str(attention), "--trainer.max_epochs", "1"])
    best = capsys.readouterr().out.split("best checkpoint: ")[1].split()[0]
    main(["fit", "--config", str(tabular), "--trainer.max_epochs", "1"])  # newer, another model
    capsys.readouterr()
    chosen = predicted(attention, "best", tmp_path / "best")
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"checkpoint {best}: AttentionMIL on crops (PatientBagDataModule)")
    assert "trained 20" in line and "validation balanced accuracy" in line
    assert f"threshold {chosen['threshold'].iloc[0]:.3f} (chosen on its" in line
    explicit = predicted(attention, best, tmp_path / "explicit")
    assert chosen["probability"].tolist() == explicit["probability"].tolist()
    with pytest.raises(SystemExit) as exc:  # no run of this data setting
        main(["predict", "--config", str(attention), "--ckpt_path", "best",
              "--data.crops.image_size", "16"])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no run fits the config" in err
    assert "comes from a TabularMLP run" in err and "comes from a AttentionMIL run" in err


def test_a_checkpoint_that_does_not_fit_the_config_is_one_line_naming_both(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    attention = runs_config(tmp_path / "attention.yaml", dlmi_root, tmp_path / "cache")
    tabular = runs_config(tmp_path / "tabular.yaml", dlmi_root, tmp_path / "cache", "TabularMLP")
    main(["fit", "--config", str(tabular), "--trainer.max_epochs", "1"])
    tabular_best = capsys.readouterr().out.split("best checkpoint: ")[1].split()[0]
    for config, extra, expected in (
        (attention, [], "model TabularMLP vs AttentionMIL"),  # ran the TabularMLP silently
        (tabular, ["--data.crops.image_size", "16"], "data image_size 32 vs 16"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["predict", "--config", str(config), "--ckpt_path", tabular_best, *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and expected in err and "(checkpoint vs config)" in err
        assert len(err.strip().splitlines()) == 1


def test_fit_chooses_the_threshold_on_its_validation_patients_and_marks_in_sample_patients(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = runs_config(tmp_path / "tabular.yaml", dlmi_root, tmp_path / "cache", "TabularMLP")
    main(["fit", "--config", str(config), "--trainer.max_epochs", "3"])
    out = capsys.readouterr().out
    best = Path(out.split("best checkpoint: ")[1].split()[0])
    content = torch.load(best, map_location="cpu", weights_only=True)
    meta = content["lympho_mil"]
    train, val = meta["data"]["train_ids"], meta["data"]["val_ids"]
    assert train and val and not set(train) & set(val)
    # independently: the validation patients' probabilities, then the rule of cv
    model = TabularMLP.load_from_checkpoint(best, threshold=0.5)
    crops = CropSettings(image_size=32, cache_dir=str(tmp_path / "cache"))
    split = SplitSettings(train_ids=train, val_ids=val)
    dm = PatientBagDataModule(str(dlmi_root), crops=crops, split=split)
    records = [r for b in quiet_trainer().predict(model, dm.val_dataloader()) for r in b]
    expected = best_balanced_accuracy_threshold(
        [r["probability"] for r in records], [r["label"] for r in records]
    )
    assert float(content["state_dict"]["threshold"]) == pytest.approx(expected)
    assert (meta["threshold"]["policy"], meta["threshold"]["n_patients"]) == ("inner_val", len(val))
    assert f"threshold: {expected:.3f}, chosen on the {len(val)} validation patients" in out
    # predicting patients it trained or validated on marks them
    seen, unlabelled = [*train[:2], *val[:1]], "|".join(sorted(dm.predict_split))
    detail = predicted(config, str(best), tmp_path / "pred", "--data.predict_ids", json.dumps(seen))
    assert detail.loc[seen, "in_sample"].tolist() == [True, True, True]
    assert f"threshold {expected:.3f} (chosen on its {len(val)} validation patients" in (
        capsys.readouterr().out
    )
    detail = predicted(config, str(best), tmp_path / "new")
    assert not detail["in_sample"].any() and "|".join(sorted(detail.index)) == unlabelled
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1", "--threshold_policy",
          "fixed"])  # fmt: skip
    kept = Path(capsys.readouterr().out.split("best checkpoint: ")[1].split()[0])
    content = torch.load(kept, map_location="cpu", weights_only=True)
    assert float(content["state_dict"]["threshold"]) == 0.5
    assert content["lympho_mil"]["threshold"]["policy"] == "fixed"


def test_a_run_that_fails_leaves_no_empty_version_folder(
    dlmi_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = runs_config(tmp_path / "cfg.yaml", dlmi_root, tmp_path / "cache", "TabularMLP")

    def fails(*args: object) -> None:
        raise RuntimeError("a bug in the first step")

    monkeypatch.setattr(TabularMLP, "training_step", fails)
    with pytest.raises(RuntimeError, match="a bug in the first step"):
        main(["fit", "--config", str(config)])
    assert list((tmp_path / "logs").rglob("version_*")) == []
