"""A read-only output folder or a disk that fills mid-write: one line naming the folder or
file, exit status 2, nothing half-written and nothing earlier lost."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
import yaml
from fsspec.implementations.local import LocalFileOpener
from trainers import cli_trainer

from lympho_mil.cli import main
from lympho_mil.data.synthetic import make_synthetic_dlmi


@pytest.fixture(scope="module")
def dlmi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "dlmi"
    return make_synthetic_dlmi(root, n_patients=16, image_size=32, seed=4, max_cells=16)


def write_config(folder: Path, root: Path, cache: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": cli_trainer(folder / "runs", max_epochs=2),
        "model": {
            "class_path": "AttentionMIL",
            "init_args": {"encoder": {"kwargs": {"width": 8}, "out_dim": 16}},
        },
        "data": {
            "class_path": "PatientBagDataModule",
            "init_args": {
                "root": str(root),
                "crops": {"image_size": 32, "cache_dir": str(cache)},
                "loader": {"batch_size": 4},
            },
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(dlmi_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A config and the last checkpoint of its fit (its cache warm)."""
    folder = tmp_path_factory.mktemp("trained")
    config = write_config(folder, dlmi_root, folder / "cache")
    main(["fit", "--config", str(config)])
    (last,) = folder.glob("runs/lightning_logs/version_0/checkpoints/last.ckpt")
    return config, last


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_error_line(capsys: pytest.CaptureFixture[str], exc: pytest.ExceptionInfo) -> str:
    """The command's single error line (asserting exit status 2 and no traceback)."""
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("lympho-mil: error:")]
    return line


def read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``folder`` as on a read-only file system, where access() refuses writing (a chmod would
    not stop a test run as root)."""
    access = os.access

    def refusing(path: str | Path, mode: int, *args: object, **kwargs: object) -> bool:
        if mode & os.W_OK and Path(path).absolute().is_relative_to(folder):
            return False
        return access(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", refusing)


@pytest.mark.parametrize("command", ["fit", "predict", "cv"])
def test_a_read_only_output_folder_is_one_line_before_any_work(
    trained: tuple[Path, Path],
    tmp_path: Path,
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, last = trained
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "earlier.txt").write_text("an earlier result")
    before = files_under(locked)
    args = {
        "fit": ["fit", "--config", str(config), f"--trainer.default_root_dir={locked}"],
        "predict": [
            "predict",
            "--config",
            str(config),
            f"--ckpt_path={last}",
            f"--prediction.output_dir={locked / 'pred'}",
        ],
        "cv": ["cv", "--config", str(config), "--cv.folds=2", f"--cv.out={locked / 'cv'}"],
    }[command]
    read_only(monkeypatch, locked)
    with pytest.raises(SystemExit) as exc:
        main(args)
    line = one_error_line(capsys, exc)
    assert f"{locked}" in line and "not writable" in line
    assert files_under(locked) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write permission")
def test_a_folder_without_write_permission_is_one_line(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, last = trained
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(SystemExit) as exc:
            main(
                [
                    "predict",
                    "--config",
                    str(config),
                    f"--ckpt_path={last}",
                    "--prediction.output_dir",
                    str(locked),
                ]
            )
        assert str(locked) in one_error_line(capsys, exc)
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one(
    dlmi_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, dlmi_root, tmp_path / "cache")
    written = LocalFileOpener.write
    saved: list[bytes] = []

    def fills_at_the_second_last_ckpt(self: LocalFileOpener, data: bytes) -> int:
        if not self.path.endswith("last.ckpt"):
            return written(self, data)
        if not saved:
            saved.append(data)
            return written(self, data)
        written(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(LocalFileOpener, "write", fills_at_the_second_last_ckpt)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config)])
    folder = tmp_path / "runs/lightning_logs/version_0/checkpoints"
    line = one_error_line(capsys, exc)
    assert f"{folder / 'last.ckpt'}: No space left on device" in line
    assert (folder / "last.ckpt").read_bytes() == saved[0]  # the first epoch's, whole
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 0
    assert [p.name for p in folder.iterdir() if "last" in p.name] == ["last.ckpt"]


def test_a_full_disk_while_predictions_are_written_keeps_the_earlier_ones(
    trained: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, last = trained
    out = tmp_path / "pred"
    args = ["predict", "--config", str(config), f"--ckpt_path={last}"]
    main([*args, f"--prediction.output_dir={out}"])
    before = files_under(out)
    fsync, calls = os.fsync, []

    def fills_at_the_second_file(fd: int) -> None:  # where delayed allocation reports it
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fills_at_the_second_file)
    with pytest.raises(SystemExit) as exc:
        main([*args, f"--prediction.output_dir={out}", "--prediction.overwrite=true"])
    line = one_error_line(capsys, exc)
    assert f"{out / 'predictions_detail.csv'}: No space left on device" in line
    assert files_under(out) == before  # all three earlier files, none replaced alone


def test_a_full_disk_while_a_cache_is_built_leaves_no_cache(
    dlmi_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, dlmi_root, tmp_path / "cache")

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room, raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config)])
    line = one_error_line(capsys, exc)
    assert f"{tmp_path / 'cache'}/crops-" in line and "No space left on device" in line
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]
