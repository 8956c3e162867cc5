"""Decode every crop once into a memory-mapped uint8 array, keyed by what produced it.

JPEG decoding dominates CPU time; training reads the decoded pixels from the cache and
augments from there. The cache file is ``<cache_dir>/crops-<key>.npy`` plus a JSON sidecar;
``key`` hashes the contents of the files, in order, and the preprocessing (size, crop), so a
replaced JPEG, or another image size, gives another key and a rebuild, while the same crops
in another folder (a copy, a new cohort's folder) reuse the cache. A cache whose bytes no
longer match the checksum in its sidecar is rebuilt, never used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image, UnidentifiedImageError

from lympho_mil.arguments import SettingError
from lympho_mil.data.errors import DataError
from lympho_mil.files import atomic_write_text, file_digest, naming
from lympho_mil.progress import progress

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: 16-bit greyscale decoded to its top 8 bits (was clipped white)
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of caches checked this run


def default_cache_dir() -> Path:
    """``$LYMPHO_MIL_CACHE`` or ``~/.cache/lympho_mil`` (never inside the data folder)."""
    configured = os.environ.get("LYMPHO_MIL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lympho_mil"


@dataclass(frozen=True)
class CropSpec:
    """How a file becomes cached pixels: optional centre crop (source px), then resize."""

    image_size: int = 224
    center_crop: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise SettingError(f"image_size must be >= 8, got {self.image_size}")
        if self.center_crop is not None and self.center_crop < 8:
            raise SettingError(f"center_crop must be >= 8 or None, got {self.center_crop}")


def decode_crop(path: Path, spec: CropSpec) -> np.ndarray:
    """uint8[S, S, 3]: decode, convert to RGB, centre-crop, resize. DataError names the file.

    16-bit greyscale keeps its top 8 bits; 32-bit integer or float pixels, whose range is
    unknown, are refused."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16"):
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            elif img.mode in ("I", "F"):
                raise DataError(
                    f"patient {path.parent.name}: image {path} has 32-bit pixels (mode "
                    f"{img.mode}) of unknown range; save it with 8 or 16 bits per channel"
                )
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"patient {path.parent.name}: cannot read image {path}: {exc}") from exc
    if spec.center_crop is not None:
        w, h = rgb.size
        c = min(spec.center_crop, w, h)
        left, top = (w - c) // 2, (h - c) // 2
        rgb = rgb.crop((left, top, left + c, top + c))
    if rgb.size != (spec.image_size, spec.image_size):
        rgb = rgb.resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def cache_key(paths: Sequence[Path], spec: CropSpec) -> str:
    """Hash of every file's content (in order) plus the crop spec and cache version: where
    the files are, and when they were touched, do not count."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(spec)]).encode())
    for path in paths:
        digest.update(f"{file_digest(path)}\n".encode())
    return digest.hexdigest()[:24]


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


class MemmapRows:
    """Rows of an ``.npy`` file, memory-mapped on first use; picklable (each DataLoader
    worker reopens the file lazily instead of receiving the array)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[rows])

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_array": None}


class ImageCache(MemmapRows):
    """uint8[M, S, S, 3] crops, memory-mapped; picklable (reopened lazily in each worker).

    ``bad`` lists the rows whose file could not be decoded (only when built with
    ``skip_bad_images=True``); those rows hold zeros and must not be used.
    """

    def __init__(self, path: Path, bad: Sequence[int] = ()) -> None:
        super().__init__(path)
        self.bad = tuple(bad)

    @classmethod
    def build_or_load(
        cls,
        paths: Sequence[Path],
        spec: CropSpec,
        cache_dir: str | Path | None = None,
        skip_bad_images: bool = False,
        threads: int | None = None,
    ) -> ImageCache:
        """Load the cache for ``paths`` + ``spec`` if it is intact, else (re)build it.

        ``cache_dir`` defaults to ``$LYMPHO_MIL_CACHE`` or ``~/.cache/lympho_mil``; ``threads``
        decode in parallel (default: one per CPU). An unreadable image raises
        `DataError` unless ``skip_bad_images`` (then its row is listed in ``bad``).
        """
        cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        key = cache_key(paths, spec)
        data_path = cache_dir / f"crops-{key}.npy"
        meta_path = cache_dir / f"crops-{key}.json"
        meta = load_or_build(
            data_path,
            meta_path,
            CACHE_VERSION,
            "image cache",
            lambda: cls._build(paths, spec, data_path, meta_path, key, skip_bad_images, threads),
        )
        if meta["bad"]:
            if not skip_bad_images:
                raise DataError(
                    f"unreadable image(s) {meta['bad_files'][:5]}; pass skip_bad_images=True "
                    "(--data.crops.skip_bad_images true) to skip them"
                )
            _warn_skipped(meta["bad_files"])
        return cls(data_path, meta["bad"])

    @classmethod
    def _build(
        cls,
        paths: Sequence[Path],
        spec: CropSpec,
        data_path: Path,
        meta_path: Path,
        key: str,
        skip_bad_images: bool,
        threads: int | None,
    ) -> dict[str, Any]:
        """Decode every crop into the cache; returns its sidecar."""
        shape = (len(paths), spec.image_size, spec.image_size, 3)

        def fill(array: np.ndarray) -> dict[str, Any]:
            log.debug("decoding %d crops into %s", len(paths), data_path)
            bad = _decode_into(array, paths, spec, skip_bad_images, threads)
            return {"bad": bad, "bad_files": [str(paths[i]) for i in bad]}

        return write_cache(
            data_path,
            meta_path,
            shape,
            np.uint8,
            fill,
            {"version": CACHE_VERSION, "key": key, "spec": asdict(spec)},
        )


# -- shared by the caches of this package: an .npy array plus a JSON sidecar ------------------
def read_sidecar(meta_path: Path, version: int) -> dict[str, Any] | None:
    """The JSON sidecar of a cache file, or None when it is absent, unreadable or stale."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != version:
        return None
    return meta


def load_or_build(
    data_path: Path,
    meta_path: Path,
    version: int,
    what: str,
    build: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """The sidecar of the intact cache ``data_path``; when it is absent, stale or corrupted
    (a warning naming the ``what``), ``build`` writes it and returns its sidecar.

    Building holds a lock file beside the cache (``<name>.lock``): of several processes that
    want one cache (two fits, a fit and a cv), one builds it and the others wait, then load it.
    The kernel releases the lock of a killed process. An intact cache is loaded without the
    lock (a read-only cache folder works), which is safe: a cache and its sidecar only ever
    appear whole (`write_cache`).
    """
    meta = intact_sidecar(data_path, meta_path, version)
    if meta is not None:
        return meta
    with cache_lock(data_path):
        meta = intact_sidecar(data_path, meta_path, version, corrupted=what)
        if meta is not None:
            return meta
        for stale in data_path.parent.glob(f"{data_path.name}.tmp*"):  # of a killed build
            stale.unlink(missing_ok=True)
        return build()


def intact_sidecar(
    data_path: Path, meta_path: Path, version: int, corrupted: str | None = None
) -> dict[str, Any] | None:
    """The sidecar of ``data_path`` when both exist and the file still has the bytes the
    sidecar's checksum describes (hashed once per process, until its size or mtime change);
    else None, with a warning that the ``corrupted`` cache is rebuilt for a checksum that no
    longer matches."""
    meta = read_sidecar(meta_path, version)
    if meta is None or not data_path.is_file():
        return None
    if _stamp(data_path) in _VERIFIED or file_digest(data_path) == meta["checksum"]:
        _VERIFIED.add(_stamp(data_path))
        return meta
    if corrupted:
        warnings.warn(f"{corrupted} {data_path} is corrupted; rebuilding it", stacklevel=4)
    return None


@contextmanager
def cache_lock(data_path: Path) -> Iterator[None]:
    """Hold the lock file ``<data_path>.lock``, saying so when another process holds it."""
    data_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(data_path.with_name(data_path.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another process to finish building %s", data_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_cache(
    data_path: Path,
    meta_path: Path,
    shape: tuple[int, ...],
    dtype: Any,
    fill: Callable[[np.ndarray], dict[str, Any]],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Create the array file ``data_path`` (``.npy``, ``shape``, ``dtype``), let ``fill``
    write every row through a memmap, then write its sidecar.

    The sidecar holds ``meta``, what ``fill`` returns, the shape and the file's checksum.
    The array is written to a temporary file renamed into place, so an interrupted build
    leaves no cache behind. Its blocks are reserved first: a disk too full for it is an
    OSError naming ``data_path`` before any work (a memory map would crash the process at
    the first page that finds no room). Returns the sidecar.
    """
    data_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = data_path.with_name(data_path.name + f".tmp{os.getpid()}")
    try:
        array = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=dtype, shape=shape)
        _reserve(tmp_path)
        extra = fill(array)
        array.flush()
        del array
        os.replace(tmp_path, data_path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise naming(exc, data_path) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    meta = {**meta, **extra, "shape": list(shape), "checksum": file_digest(data_path)}
    atomic_write_text(meta_path, json.dumps(meta), overwrite=True)
    _VERIFIED.add(_stamp(data_path))
    return meta


def _reserve(path: Path) -> None:
    """Allocate every block of the (sparse) file ``path``; ENOSPC when the disk lacks room.
    Skipped where the system or file system cannot (macOS, some network file systems)."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise


def _decode_into(
    array: np.ndarray,
    paths: Sequence[Path],
    spec: CropSpec,
    skip_bad_images: bool,
    threads: int | None,
) -> list[int]:
    """Decode every path into its row of ``array`` (threads: PIL releases the GIL)."""
    bad: list[int] = []
    failed = threading.Event()  # the first unreadable image stops the rest

    def fill(row: int) -> None:
        if failed.is_set():
            return
        try:
            array[row] = decode_crop(paths[row], spec)
        except DataError as exc:
            if not skip_bad_images:
                failed.set()
                raise DataError(
                    f"{exc}; pass skip_bad_images=True (--data.crops.skip_bad_images true) to "
                    "leave it out"
                ) from None
            bad.append(row)

    with (
        progress("decoding crops into the cache", len(paths)) as bar,
        ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool,
    ):
        for _ in pool.map(fill, range(len(paths))):
            bar.update()
    return sorted(bad)


def _warn_skipped(bad_files: Sequence[str]) -> None:
    warnings.warn(
        f"skipping {len(bad_files)} unreadable image(s): {list(bad_files)[:5]}", stacklevel=3
    )
