"""Safe output files: written atomically, never overwritten unless asked, into folders checked
to be writable; a full disk or a read-only folder is an error that names the file. Digests of
file contents."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)
"""What a full disk (or quota) and a read-only folder raise."""


class OutputExistsError(FileExistsError):
    """An output file exists and overwriting was not asked for."""


class OutputFolderError(PermissionError):
    """Files cannot be created in an output folder (read-only, or a file in its place)."""


def check_writable(paths: Sequence[Path], overwrite: bool, hint: str = "overwrite=True") -> None:
    """Raise `OutputExistsError` naming the files that exist, unless ``overwrite``
    (``hint`` says how the caller's user allows overwriting), and `OutputFolderError` when
    their folders cannot be written (`check_folder_writable`)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"output file(s) {existing} exist; pass {hint} or choose another output folder"
        )
    for folder in dict.fromkeys(Path(p).parent for p in paths):
        check_folder_writable(folder)


def check_folder_writable(folder: str | Path) -> None:
    """Raise `OutputFolderError` when files cannot be created in ``folder``, or, while it does
    not exist, in the first existing folder above it (where it would be made): no write
    permission, a read-only file system, or a file in the way."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(f"output folder {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder.absolute() else f" ({existing} is not)"
        raise OutputFolderError(
            f"output folder {folder} is not writable{where}: read-only or without write "
            "permission; choose another folder"
        )


def naming(exc: OSError, path: str | Path) -> OSError:
    """``exc`` (its type, errno and reason) naming ``path``, the file the user asked for: a
    write that fills the disk names no file, and a temporary file's name means nothing to a
    user. What `write_error_message` shows."""
    return type(exc)(exc.errno, exc.strerror, str(path))


def write_error_message(exc: BaseException) -> str | None:
    """One line for a full-disk or read-only-folder error (`WRITE_ERRNOS`) in the chain of
    ``exc``, the first that names its file (an error raised while Lightning cleans up after
    the first may name none); None when the chain holds none (another error)."""
    found: list[OSError] = []
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            found.append(seen)
        seen = seen.__cause__ or seen.__context__
    named = [e for e in found if e.filename is not None] + found
    if not named:
        return None
    return f"{named[0].filename}: {named[0].strerror}" if named[0].filename else str(named[0])


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (no partial file)."""
    return atomic_write_files({path: data}, overwrite)[0]


def atomic_write_files(
    contents: Mapping[str | Path, bytes | str], overwrite: bool = False
) -> list[Path]:
    """Write several files (``str`` as UTF-8) as one: each through a temporary file beside
    it, all renamed into place only once every one is whole. A failure (a full disk, a bad
    content) leaves the earlier files, not a mix of earlier and new ones, and neither a
    temporary file nor a folder it made; its OSError names the file it was writing. Returns
    the paths."""
    paths = [Path(p) for p in contents]
    check_writable(paths, overwrite)
    data = [c.encode() if isinstance(c, str) else c for c in contents.values()]
    return _write_together(paths, data)


def atomic_write_folder(
    out_dir: str | Path,
    files: Mapping[str, bytes],
    overwrite: bool = False,
    replaces: Sequence[str] = (),
) -> list[Path]:
    """Write ``files`` (name -> bytes) into ``out_dir`` together, as `atomic_write_files`
    does: a failure leaves nothing of them (nor the folder, when this call made it).

    Raises `OutputExistsError` before writing when any of ``files`` or ``replaces`` exists,
    unless ``overwrite``; then the names of ``replaces`` not in ``files`` (outputs of an
    earlier run that this one does not write) are removed.
    """
    out_dir = Path(out_dir)
    check_writable([out_dir / name for name in (*files, *replaces)], overwrite)
    paths = _write_together([out_dir / name for name in files], list(files.values()))
    for name in set(replaces) - set(files):
        (out_dir / name).unlink(missing_ok=True)
    return paths


def _write_together(paths: list[Path], contents: list[bytes]) -> list[Path]:
    """The one mechanism of the writers above: every content into a temporary file beside
    its path, then every rename; on a failure, the temporary files and the folders made for
    them are removed and the earlier files stay."""
    made = _missing_folders(paths)
    written: list[str] = []
    try:
        for path, data in zip(paths, contents, strict=True):
            written.append(_write_temporary(path, data))
    except BaseException:
        for tmp in written:
            Path(tmp).unlink(missing_ok=True)
        for folder in made:  # deepest first; only those left empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for tmp, path in zip(written, paths, strict=True):
        os.replace(tmp, path)  # a rename within a folder needs no room
    return paths


def _missing_folders(paths: Sequence[Path]) -> list[Path]:
    """The folders above ``paths`` that do not exist yet, deepest first."""
    missing: set[Path] = set()
    for path in paths:
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            missing.add(folder)
            folder = folder.parent
    return sorted(missing, key=lambda f: len(f.parts), reverse=True)


def _write_temporary(path: Path, data: bytes) -> str:
    """``data`` in a new temporary file beside ``path``, flushed to disk; its name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise naming(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # as a plain open() would create it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise naming(exc, path) from exc
        raise
    return tmp


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
