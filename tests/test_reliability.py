"""Faults a long run must survive: kills and resume, determinism, hostile checkpoints, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from reports import without_timing
from trainers import cli_trainer

from lympho_mil.cli import main
from lympho_mil.data.synthetic import make_synthetic_dlmi

REPO = Path(__file__).resolve().parents[1]

KILL_POINT = '''
import time
from pathlib import Path
from lightning.pytorch.callbacks import Callback

class PauseAt(Callback):
    """Writes a marker, then waits to be killed, at one training batch (test-only)."""

    def __init__(self, epoch: int, batch: int, marker: str) -> None:
        self.epoch, self.batch, self.marker = epoch, batch, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            Path(self.marker).write_text("paused")
            for _ in range(600):  # until killed; SIGTERM lets Lightning stop after this step
                if getattr(trainer, "received_sigterm", False):
                    return
                time.sleep(0.2)
'''


@pytest.fixture(scope="module")
def dlmi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliability") / "dlmi"
    return make_synthetic_dlmi(root, n_patients=16, image_size=32, seed=2, max_cells=18)


def write_config(folder: Path, root: Path, epochs: int = 3, **trainer: object) -> Path:
    config = {
        "seed_everything": 3,
        "trainer": cli_trainer(
            folder, **{"max_epochs": epochs, "deterministic": True, "logger": False, **trainer}
        ),
        "model": {
            "class_path": "AttentionMIL",
            "init_args": {"encoder": {"kwargs": {"width": 8}, "out_dim": 16}, "dropout": 0.3},
        },
        "data": {
            "class_path": "PatientBagDataModule",
            "init_args": {
                "root": str(root),
                "crops": {"image_size": 32, "cache_dir": str(folder / "cache")},
                "loader": {"batch_size": 3},
                "max_instances": 6,
            },
        },
        "checkpoint": {"dirpath": str(folder / "ckpt")},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(folder / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_cli(args: list[str], cwd: Path, env_path: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(env_path), env.get("PYTHONPATH", "")])
    code = f"from lympho_mil.cli import main; main({args!r})"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_fits_with_one_seed_are_identical(dlmi_root: Path, tmp_path: Path) -> None:
    predictions = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(folder, dlmi_root, epochs=2)
        main(["fit", "--config", str(config)])
        main(
            [
                "predict",
                "--config",
                str(config),
                "--ckpt_path",
                str(folder / "ckpt/last.ckpt"),
                "--prediction.output_dir",
                str(folder / "pred"),
            ]
        )
        predictions.append(pd.read_csv(folder / "pred" / "predictions_detail.csv"))
    assert_same_state(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    pd.testing.assert_frame_equal(predictions[0], predictions[1])


def quickstart_config(folder: Path, synthetic: Path, **data: object) -> Path:
    """The shipped quickstart config as written (loader workers, persistent workers, bag
    subsets, CPU augmentation), at small sizes, with the issue's seed and 3 epochs."""
    config = yaml.safe_load((REPO / "examples/configs/quickstart.yaml").read_text())
    config["seed_everything"] = 3
    config["trainer"].update(
        max_epochs=3,
        deterministic=True,
        enable_progress_bar=False,
        default_root_dir=str(folder),
    )
    config["model"]["init_args"].update(
        encoder={"name": "small_cnn", "kwargs": {"width": 8}, "out_dim": 16},
        pooling={"name": "attention", "hidden": 16},
    )
    init = config["data"]["init_args"]
    init.update(
        root=str(synthetic),
        synthetic={"n_patients": 24, "image_size": 32, "max_cells": 20},
        crops={"image_size": 32, "cache_dir": str(folder / "cache")},
        loader={**init["loader"], "batch_size": 4},
        max_instances=8,
        **data,
    )
    assert init["loader"]["num_workers"] == 2  # what the quickstart ships
    assert init["loader"]["persistent_workers"]
    config["checkpoint"] = {"dirpath": str(folder / "ckpt")}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def last_epoch_metrics(folder: Path) -> pd.Series:
    """The logged metrics of the last epoch, over every run (version) of ``folder``."""
    logs = sorted((folder / "lightning_logs").glob("version_*/metrics.csv"))
    frame = pd.concat([pd.read_csv(log) for log in logs])
    epochs = frame.groupby("epoch").last()
    return epochs.loc[epochs.index.max()].filter(like="val_")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "data"),
    [
        (signal.SIGKILL, {}),
        (signal.SIGTERM, {}),
        (signal.SIGKILL, {"augment": {"mode": "gpu", "cache_on_device": True}}),
    ],
    ids=["SIGKILL", "SIGTERM", "SIGKILL-device-augmentation"],
)
def test_killed_mid_epoch_then_resumed_matches_uninterrupted(
    tmp_path: Path, sig: signal.Signals, data: dict[str, object]
) -> None:
    """The quickstart config with its loader workers, killed in the middle of the second
    epoch (after the first checkpoint) and resumed with --ckpt_path last in a new process."""
    synthetic = tmp_path / "synthetic"
    reference = tmp_path / "reference"
    reference.mkdir()
    uninterrupted = run_cli(
        ["fit", "--config", str(quickstart_config(reference, synthetic, **data))], reference
    )
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()

    run = tmp_path / "killed"
    run.mkdir()
    (run / "killpoint.py").write_text(KILL_POINT)
    config = quickstart_config(run, synthetic, **data)
    marker = run / "paused"
    pause = {
        "class_path": "killpoint.PauseAt",
        "init_args": {"epoch": 1, "batch": 2, "marker": str(marker)},
    }
    process = run_cli(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.callbacks+",
            yaml.safe_dump(pause, default_flow_style=True).strip(),
        ],
        run,
        run,
    )
    deadline = time.time() + 240
    while not marker.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.time() < deadline, "the run never reached the kill point"
        time.sleep(0.2)
    process.send_signal(sig)
    process.wait(timeout=60)
    interrupted = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert interrupted["epoch"] == 0  # the kill really cut the run short

    resumed = run_cli(["fit", "--config", str(config), "--ckpt_path", "last"], run, run)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_state(final_state(reference), final_state(run))
    pd.testing.assert_series_equal(last_epoch_metrics(reference), last_epoch_metrics(run))


@pytest.mark.slow
def test_a_killed_cv_run_again_writes_the_uninterrupted_report(tmp_path: Path) -> None:
    """cv of the quickstart config (3 folds x 2 repeats, loader workers), SIGKILLed once its
    first fold has finished, then run again with the same arguments in a new process."""
    config = quickstart_config(tmp_path, tmp_path / "synthetic")
    reports = {}
    for name in ("uninterrupted", "killed"):
        folder = tmp_path / name
        folder.mkdir()
        args = ["cv", "--config", str(config), "--cv.folds=3", "--cv.repeats=2"]
        args += ["--cv.n_bootstrap=200", f"--cv.out={folder / 'cv'}"]
        process = run_cli(args, folder)
        if name == "killed":
            first = folder / "cv" / "folds" / "r0_f0" / "fold_run.json"
            deadline = time.time() + 300
            while not first.exists():
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.time() < deadline, "the first fold never finished"
                time.sleep(0.1)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            assert not (folder / "cv" / "cv_report.json").exists()  # cut short
            assert not (folder / "cv" / "folds" / "r1_f2" / "fold_run.json").exists()
            kept = first.stat().st_mtime_ns
            process = run_cli(args, folder)
        assert process.wait(timeout=600) == 0, process.stderr.read() if process.stderr else ""
        if name == "killed":
            assert first.stat().st_mtime_ns == kept  # the finished fold was not run again
        reports[name] = json.loads((folder / "cv" / "cv_report.json").read_text())
    assert without_timing(reports["killed"]) == without_timing(reports["uninterrupted"])


def test_a_failed_checkpoint_write_leaves_the_previous_one_usable(
    dlmi_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fsspec.implementations.local import LocalFileOpener
    from lightning.fabric.utilities.cloud_io import _atomic_save

    config = write_config(tmp_path, dlmi_root, epochs=1)
    main(["fit", "--config", str(config)])
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    checkpoint["epoch"] = 99

    def write_half_then_die(self: LocalFileOpener, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(LocalFileOpener, "write", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        _atomic_save(checkpoint, last)  # what Trainer.save_checkpoint calls
    assert last.read_bytes() == before
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0


class Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_runs_code_is_refused(
    dlmi_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Boom()}, evil)
    config = write_config(tmp_path, dlmi_root)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "predict",
                "--config",
                str(config),
                "--ckpt_path",
                str(evil),
                "--prediction.output_dir",
                str(tmp_path / "pred"),
            ]
        )
    assert exc.value.code == 2
    assert "refusing to load a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "pred" / "predictions.csv").exists()


def test_a_checkpoint_without_the_format_marker_is_refused(
    dlmi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, dlmi_root, epochs=1)
    main(["fit", "--config", str(config)])
    checkpoint = torch.load(tmp_path / "ckpt/last.ckpt", map_location="cpu", weights_only=True)
    del checkpoint["lympho_mil"]
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    with pytest.raises(SystemExit):
        main(
            [
                "predict",
                "--config",
                str(config),
                "--ckpt_path",
                str(tmp_path / "foreign.ckpt"),
                "--prediction.output_dir",
                str(tmp_path / "pred"),
            ]
        )
    assert "checkpoint format None is not the one" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()


DDP_SCRIPT = """
import json, sys
import lightning as L
from lympho_mil import AttentionMIL, PatientBagDataModule
from lympho_mil.evaluation import PredictionWriter

root, cache, out, devices, ckpt = sys.argv[1:6]
L.seed_everything(0)
dm = PatientBagDataModule(root, crops={"image_size": 32, "cache_dir": cache}, max_instances=6,
                          loader={"batch_size": 2}, split={"val_fraction": 0.5})
model = AttentionMIL(encoder={"kwargs": {"width": 8}, "out_dim": 16}, tabular_dim=dm.tabular_dim,
                     tabular_stats=dm.tabular_stats)
kwargs = dict(accelerator="cpu", devices=int(devices), logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False)
if int(devices) > 1:
    kwargs["strategy"] = "ddp"
trainer = L.Trainer(max_epochs=1, **kwargs)
if ckpt == "train":  # fit under this strategy, then evaluate the saved model
    trainer.fit(model, dm)
    ckpt = out + "/model.ckpt"
    trainer.save_checkpoint(ckpt)
metrics = trainer.validate(model, dm, ckpt_path=ckpt, verbose=False)[0]
writer = PredictionWriter(out + "/pred", overwrite=True)
L.Trainer(callbacks=[writer], **kwargs).predict(model, dm.val_dataloader(), ckpt_path=ckpt,
                                               return_predictions=False)
if trainer.is_global_zero:
    with open(out + "/metrics.json", "w") as handle:
        json.dump(metrics, handle)
"""


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(dlmi_root: Path, tmp_path: Path) -> None:
    """Fit under DDP (2 processes), then evaluate that model with 2 processes and with 1."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    results = {}
    for devices, ckpt in ((2, "train"), (1, str(tmp_path / "devices2" / "model.ckpt"))):
        out = tmp_path / f"devices{devices}"
        out.mkdir()
        done = subprocess.run(
            [
                sys.executable,
                str(script),
                str(dlmi_root),
                str(tmp_path / "cache"),
                str(out),
                str(devices),
                ckpt,
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = pd.read_json(out / "metrics.json", typ="series")
        detail = pd.read_csv(out / "pred" / "predictions_detail.csv")
        results[devices] = (metrics, detail)
    (single, single_pred), (ddp, ddp_pred) = results[1], results[2]
    assert ddp["val_balanced_accuracy"] == single["val_balanced_accuracy"]
    assert ddp["val_auroc"] == pytest.approx(single["val_auroc"], abs=1e-6)
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    assert ddp_pred["id"].is_unique and sorted(ddp_pred["id"]) == sorted(single_pred["id"])
    merged = ddp_pred.merge(single_pred, on="id", suffixes=("_ddp", "_single"))
    assert merged["probability_ddp"].to_numpy() == pytest.approx(
        merged["probability_single"].to_numpy(), abs=1e-5
    )


LOGIT_SUM_DDP_SCRIPT = """
import sys
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from lympho_mil import LogitSumMIL, collate_bags
from lympho_mil.data import BagSample

def bags(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        label = b % 2
        values = rng.normal(0.6 * label, 1.0, (6, 4))
        types = np.eye(2)[(rng.random(6) < 0.3 + 0.4 * label).astype(int)]
        x = torch.tensor(np.concatenate([values, types], axis=1), dtype=torch.float32)
        clinical = torch.tensor([label + rng.normal(), rng.normal(), 0.0], dtype=torch.float32)
        out.append(BagSample(x, clinical, float(label), f"P{b}", [str(i) for i in range(6)]))
    return out

L.seed_everything(0)
model = LogitSumMIL(in_dim=6, cell_types=2, tabular_dim=3, optim={"lr": 0.05})
train = DataLoader(bags(24, 0), batch_size=4, shuffle=True, collate_fn=collate_bags)
val = DataLoader(bags(12, 1), batch_size=3, collate_fn=collate_bags)
trainer = L.Trainer(max_epochs=6, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(model, train, val)
model.eval()
every = collate_bags(bags(12, 1))  # each process: the kept experts on all 12 patients
with torch.no_grad():
    alone = model.loss(model.infer(every), every)
torch.save({"selected_loss": model.selected_loss, "alone": alone},
           f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_logit_sum_keeps_the_same_experts_on_every_ddp_process(tmp_path: Path) -> None:
    """Under DDP (2 CPU processes, 6 validation patients each) every process keeps the same
    experts, judged on all 12 validation patients: the loss they agreed on is that of the
    kept experts on the 12 patients at once."""
    script = tmp_path / "logit_sum_ddp.py"
    script.write_text(textwrap.dedent(LOGIT_SUM_DDP_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    kept = ranks[0]["selected_loss"]
    assert torch.isfinite(kept).all()
    torch.testing.assert_close(ranks[1]["selected_loss"], kept)
    for rank in ranks:
        assert rank["alone"].item() == pytest.approx(kept.sum().item(), rel=1e-5)
