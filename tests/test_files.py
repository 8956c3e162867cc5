"""Output files: atomic, never overwritten silently, created with the usual permissions."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lympho_mil.files import (
    OutputExistsError,
    OutputFolderError,
    atomic_write_bytes,
    atomic_write_files,
    atomic_write_folder,
    atomic_write_text,
    check_folder_writable,
)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "out" / "a.csv", "first")
    with pytest.raises(OutputExistsError, match=r"a\.csv"):
        atomic_write_text(path, "second")
    assert path.read_text() == "first"
    atomic_write_text(path, "second", overwrite=True)
    assert path.read_text() == "second"


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "b.bin", 123)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "c.png", b"\x89PNG")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_several_files_are_replaced_together_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [tmp_path / "a.csv", tmp_path / "b.csv"]
    atomic_write_files({p: "earlier" for p in paths})
    fsync = os.fsync
    calls: list[int] = []

    def full_at_the_second(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_at_the_second)
    with pytest.raises(OSError, match="No space left") as exc:
        atomic_write_files({p: "new" for p in paths}, overwrite=True)
    assert exc.value.filename == str(paths[1])  # the file it was writing, not a temporary
    assert [p.read_text() for p in paths] == ["earlier", "earlier"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]


def test_a_file_in_place_of_the_output_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        check_folder_writable(tmp_path / "out" / "sub")
    check_folder_writable(tmp_path / "new" / "sub")  # would be made in a writable folder


def test_a_folder_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "report"
    previous = os.umask(0o022)
    try:
        atomic_write_folder(out, {"a.json": b"1", "b.png": b"2"}, replaces=["a.json", "c.png"])
    finally:
        os.umask(previous)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"a.json": b"1", "b.png": b"2"}
    assert out.stat().st_mode & 0o777 == 0o755

    with pytest.raises(OutputExistsError, match=r"a\.json"):
        atomic_write_folder(out, {"a.json": b"new"})
    with pytest.raises(TypeError):  # fails halfway: nothing of it lands
        atomic_write_folder(out, {"a.json": b"new", "b.png": "not bytes"}, overwrite=True)  # type: ignore[dict-item]
    assert (out / "a.json").read_bytes() == b"1"

    (out / "c.png").write_bytes(b"stale")
    atomic_write_folder(out, {"a.json": b"3"}, overwrite=True, replaces=["a.json", "c.png"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"a.json": b"3", "b.png": b"2"}
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left


def test_a_new_folder_that_fails_halfway_is_not_left_behind(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        atomic_write_folder(tmp_path / "new" / "report", {"a.json": b"1", "b.png": "not bytes"})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []
