"""Decode every crop once into a memory-mapped uint8 array, keyed by what produced it.

JPEG decoding dominates CPU time; training reads the decoded pixels from the cache and
augments from there. The cache file is ``<cache_dir>/crops-<key>.npy`` plus a JSON sidecar;
``key`` hashes the file list (paths, sizes, mtimes) and the preprocessing (size, crop), so a
touched or replaced JPEG, or another image size, gives another key and a rebuild. A cache
whose bytes no longer match the checksum in its sidecar is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lympho_mil.data.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
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
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.center_crop is not None and self.center_crop < 8:
            raise ValueError(f"center_crop must be >= 8 or None, got {self.center_crop}")


def decode_crop(path: Path, spec: CropSpec) -> np.ndarray:
    """uint8[S, S, 3]: decode, convert to RGB, centre-crop, resize. DataError names the file."""
    try:
        with Image.open(path) as img:
            img.load()
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
    """Hash of every file's path, size and mtime plus the crop spec and cache version."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(spec)]).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _file_checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class ImageCache:
    """uint8[M, S, S, 3] crops, memory-mapped; picklable (reopened lazily in each worker).

    ``bad`` lists the rows whose file could not be decoded (only when built with
    ``skip_bad_images=True``); those rows hold zeros and must not be used.
    """

    def __init__(self, path: Path, bad: Sequence[int] = ()) -> None:
        self.path = Path(path)
        self.bad = tuple(bad)
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
        return {"path": self.path, "bad": self.bad, "_array": None}

    @classmethod
    def build_or_load(
        cls,
        paths: Sequence[Path],
        spec: CropSpec,
        cache_dir: str | Path | None = None,
        skip_bad_images: bool = False,
        threads: int | None = None,
    ) -> ImageCache:
        """Load the cache for ``paths`` + ``spec`` if it is intact, else (re)build it."""
        cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        key = cache_key(paths, spec)
        data_path = cache_dir / f"crops-{key}.npy"
        meta_path = cache_dir / f"crops-{key}.json"
        meta = _read_meta(meta_path)
        if meta is not None and data_path.is_file():
            bad = meta["bad"]
            if bad and not skip_bad_images:
                raise DataError(
                    f"unreadable image(s) {meta['bad_files'][:5]}; pass skip_bad_images=True "
                    "to skip them"
                )
            if _stamp(data_path) in _VERIFIED or _file_checksum(data_path) == meta["checksum"]:
                _VERIFIED.add(_stamp(data_path))
                if bad:
                    _warn_skipped(meta["bad_files"])
                return cls(data_path, bad)
            warnings.warn(f"image cache {data_path} is corrupted; rebuilding it", stacklevel=2)
        return cls._build(paths, spec, data_path, meta_path, key, skip_bad_images, threads)

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
    ) -> ImageCache:
        data_path.parent.mkdir(parents=True, exist_ok=True)
        shape = (len(paths), spec.image_size, spec.image_size, 3)
        tmp_path = data_path.with_name(data_path.name + f".tmp{os.getpid()}")
        try:
            array = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=shape)
            log.info("decoding %d crops into %s", len(paths), data_path)
            bad = _decode_into(array, paths, spec, skip_bad_images, threads)
            array.flush()
            del array
            os.replace(tmp_path, data_path)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        bad_files = [str(paths[i]) for i in bad]
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "shape": list(shape),
            "spec": asdict(spec),
            "checksum": _file_checksum(data_path),
            "bad": bad,
            "bad_files": bad_files,
        }
        tmp_meta = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_path)
        _VERIFIED.add(_stamp(data_path))
        if bad:
            _warn_skipped(bad_files)
        return cls(data_path, bad)


def _decode_into(
    array: np.ndarray,
    paths: Sequence[Path],
    spec: CropSpec,
    skip_bad_images: bool,
    threads: int | None,
) -> list[int]:
    """Decode every path into its row of ``array`` (threads: PIL releases the GIL)."""
    bad: list[int] = []

    def fill(row: int) -> None:
        try:
            array[row] = decode_crop(paths[row], spec)
        except DataError:
            if not skip_bad_images:
                raise
            bad.append(row)

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        list(pool.map(fill, range(len(paths))))
    return sorted(bad)


def _warn_skipped(bad_files: Sequence[str]) -> None:
    warnings.warn(
        f"skipping {len(bad_files)} unreadable image(s): {list(bad_files)[:5]}", stacklevel=3
    )


def _read_meta(meta_path: Path) -> dict | None:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        return None
    return meta
