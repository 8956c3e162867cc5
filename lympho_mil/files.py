"""Safe output files: written atomically, never overwritten unless asked."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd


class OutputExistsError(FileExistsError):
    """An output file exists and overwriting was not asked for."""


def check_writable(paths: Sequence[Path], overwrite: bool, hint: str = "overwrite=True") -> None:
    """Raise `OutputExistsError` naming the files that exist, unless ``overwrite``;
    ``hint`` says how the caller's user allows overwriting."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"output file(s) {existing} exist; pass {hint} or choose another output folder"
        )


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (no partial file)."""
    path = Path(path)
    check_writable([path], overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # as a plain open() would create it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_folder(
    out_dir: str | Path,
    files: Mapping[str, bytes],
    overwrite: bool = False,
    replaces: Sequence[str] = (),
) -> list[Path]:
    """Write ``files`` (name -> content) into ``out_dir`` together: all into a temporary folder
    beside it, then moved in (a new folder: one rename), so a failure leaves nothing behind.

    Raises `OutputExistsError` before writing when any of ``files`` or ``replaces`` exists,
    unless ``overwrite``; then the names of ``replaces`` not in ``files`` (outputs of an
    earlier run that this one does not write) are removed.
    """
    out_dir = Path(out_dir)
    check_writable([out_dir / name for name in (*files, *replaces)], overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        if out_dir.exists():
            for name in files:
                os.replace(tmp / name, out_dir / name)
            for name in set(replaces) - set(files):
                (out_dir / name).unlink(missing_ok=True)
        else:
            os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would create it
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out_dir / name for name in files]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_csv(path: str | Path, frame: pd.DataFrame, overwrite: bool = False) -> Path:
    """Write a DataFrame as csv (no index), atomically."""
    return atomic_write_text(path, frame.to_csv(index=False), overwrite)
