"""Files: outputs written atomically and never overwritten unless asked; digests of contents."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
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


def file_digest(path: str | Path) -> str:
    """A hash of the file's bytes (BLAKE2b, 32 hex digits): equal contents, equal digests,
    wherever the files are."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_csv(path: str | Path, frame: pd.DataFrame, overwrite: bool = False) -> Path:
    """Write a DataFrame as csv (no index), atomically."""
    return atomic_write_text(path, frame.to_csv(index=False), overwrite)
