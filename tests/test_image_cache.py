"""The decoded-crop cache: built once, keyed by its inputs, checked, picklable."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lympho_mil.data import Bag, BagDataset, CropSpec, ImageCache, collate_bags, read_dlmi
from lympho_mil.data import image_cache as image_cache_module
from lympho_mil.data.image_cache import decode_crop, default_cache_dir

SPEC = CropSpec(image_size=16)


def image_paths(root: Path) -> list[Path]:
    _, records = read_dlmi(root)
    return [path for record in records for path in record.paths]


def fresh_decode(paths: list[Path], spec: CropSpec) -> np.ndarray:
    return np.stack([decode_crop(p, spec) for p in paths])


@pytest.fixture
def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file the cache decodes."""
    decoded: list[Path] = []

    def counting(path: Path, spec: CropSpec) -> np.ndarray:
        decoded.append(path)
        return decode_crop(path, spec)

    monkeypatch.setattr(image_cache_module, "decode_crop", counting)
    return decoded


@pytest.fixture
def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which caches this process has verified, as a fresh process would."""
    monkeypatch.setattr(image_cache_module, "_VERIFIED", set())


def test_decode_centre_crop_then_resize(tmp_path: Path) -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    image[...] = (0, 0, 255)
    image[10:30, 20:40] = (255, 0, 0)  # the central 20 x 20 square
    Image.fromarray(image).save(tmp_path / "a.png")
    cropped = decode_crop(tmp_path / "a.png", CropSpec(image_size=8, center_crop=20))
    assert cropped.shape == (8, 8, 3) and cropped.dtype == np.uint8
    assert (cropped == (255, 0, 0)).all()
    whole = decode_crop(tmp_path / "a.png", CropSpec(image_size=8))
    assert (whole[0] == (0, 0, 255)).all() and whole[..., 0].max() > 200  # border and centre


def test_decode_16_bit_greyscale_keeps_its_range(tmp_path: Path) -> None:
    """Pillow's RGB conversion would clip 16-bit values to white; 32-bit pixels are refused."""
    from lympho_mil.data import DataError

    grey = np.array([[0, 20_000], [40_000, 65_535]], np.uint16).repeat(8, 0).repeat(8, 1)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    decoded = decode_crop(tmp_path / "g16.png", CropSpec(image_size=16))
    assert decoded.shape == (16, 16, 3)
    assert decoded[::8, ::8, 0].tolist() == [[0, 20_000 >> 8], [40_000 >> 8, 255]]
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "f32.tif")
    with pytest.raises(DataError, match=r"f32\.tif.*32-bit"):
        decode_crop(tmp_path / "f32.tif", SPEC)


def test_built_once_then_reused(
    synthetic_dlmi: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = image_paths(synthetic_dlmi)
    first = ImageCache.build_or_load(paths, SPEC, cache_dir, threads=2)
    np.testing.assert_array_equal(first.array, fresh_decode(paths, SPEC))
    assert len(first) == len(paths) and first.bad == ()
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".lock", ".npy"]

    def no_decoding(path: Path, spec: CropSpec) -> np.ndarray:
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(image_cache_module, "decode_crop", no_decoding)
    again = ImageCache.build_or_load(paths, SPEC, cache_dir)
    monkeypatch.setattr(image_cache_module, "_VERIFIED", set())
    from_disk = ImageCache.build_or_load(paths, SPEC, cache_dir)
    assert again.path == from_disk.path == first.path
    np.testing.assert_array_equal(from_disk.array, first.array)


def test_the_cache_is_keyed_by_content_a_replaced_jpeg_rebuilds(
    dlmi_root: Path, tmp_path: Path, cache_dir: Path, count_decodes: list[Path]
) -> None:
    """The same crops touched, or copied into another folder (a new cohort's), reuse the
    cache; a crop replaced by other bytes rebuilds it."""
    paths = image_paths(dlmi_root)
    first = ImageCache.build_or_load(paths, SPEC, cache_dir)
    stat = paths[3].stat()
    os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    copies = [Path(shutil.copy(p, tmp_path / f"{i}{p.suffix}")) for i, p in enumerate(paths)]
    count_decodes.clear()
    touched = ImageCache.build_or_load(paths, SPEC, cache_dir)
    copied = ImageCache.build_or_load(copies, SPEC, cache_dir)
    assert touched.path == copied.path == first.path and count_decodes == []

    Image.new("RGB", (32, 32), (0, 255, 0)).save(paths[5])
    replaced = ImageCache.build_or_load(paths, SPEC, cache_dir)
    assert replaced.path != first.path and len(count_decodes) == len(paths)
    np.testing.assert_array_equal(replaced.array, fresh_decode(paths, SPEC))
    assert not np.array_equal(replaced[np.array([5])], first[np.array([5])])


def test_each_crop_spec_gets_its_own_cache(synthetic_dlmi: Path, cache_dir: Path) -> None:
    paths = image_paths(synthetic_dlmi)
    specs = [SPEC, CropSpec(image_size=24), CropSpec(image_size=16, center_crop=20)]
    caches = [ImageCache.build_or_load(paths, spec, cache_dir) for spec in specs]
    assert len({c.path for c in caches}) == len(specs)
    for cache, spec in zip(caches, specs, strict=True):
        np.testing.assert_array_equal(cache.array, fresh_decode(paths, spec))


@pytest.mark.parametrize("damage", ["flip", "flip_keep_mtime", "truncate"])
def test_corrupted_cache_is_rebuilt(
    synthetic_dlmi: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    paths = image_paths(synthetic_dlmi)
    cache = ImageCache.build_or_load(paths, SPEC, cache_dir)
    stat = cache.path.stat()
    data = bytearray(cache.path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100:] = bytes(255 - b for b in data[-100:])
    cache.path.write_bytes(bytes(data))
    if damage == "flip_keep_mtime":  # silent disk corruption, seen by a new process
        os.utime(cache.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        monkeypatch.setattr(image_cache_module, "_VERIFIED", set())
    with pytest.warns(UserWarning, match="corrupted"):
        rebuilt = ImageCache.build_or_load(paths, SPEC, cache_dir)
    np.testing.assert_array_equal(rebuilt.array, fresh_decode(paths, SPEC))


@pytest.mark.usefixtures("new_process")
def test_missing_sidecar_rebuilds(
    synthetic_dlmi: Path, cache_dir: Path, count_decodes: list[Path]
) -> None:
    paths = image_paths(synthetic_dlmi)
    cache = ImageCache.build_or_load(paths, SPEC, cache_dir)
    cache.path.with_suffix(".json").unlink()
    count_decodes.clear()
    ImageCache.build_or_load(paths, SPEC, cache_dir)
    assert len(count_decodes) == len(paths)


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LYMPHO_MIL_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.setenv("LYMPHO_MIL_CACHE", "~/cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "cache"
    for unset in (monkeypatch.delenv, lambda name: monkeypatch.setenv(name, "")):
        unset("LYMPHO_MIL_CACHE")
        assert default_cache_dir() == tmp_path / ".cache" / "lympho_mil"


def test_pickles_without_the_array(synthetic_dlmi: Path, cache_dir: Path) -> None:
    cache = ImageCache.build_or_load(image_paths(synthetic_dlmi), SPEC, cache_dir)
    assert cache.array.nbytes > 10_000  # loaded (memory-mapped) before pickling
    assert cache.__getstate__()["_array"] is None
    payload = pickle.dumps(cache)
    assert len(payload) < 1_000
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone[np.array([0, 7])], cache[np.array([0, 7])])


def test_loader_with_two_workers(synthetic_dlmi: Path, cache_dir: Path) -> None:
    paths = image_paths(synthetic_dlmi)
    cache = ImageCache.build_or_load(paths, SPEC, cache_dir)
    bags = [
        Bag(f"b{i}", i % 2, np.arange(i, i + 3 + i), tuple(map(str, range(3 + i))), np.zeros(0))
        for i in range(6)
    ]

    def to_tensor(crops: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(crops).float()

    dataset = BagDataset(bags, cache, to_tensor)
    batches = [
        list(DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collate_bags))
        for workers in (0, 2)
    ]
    for serial, parallel in zip(*batches, strict=True):
        assert serial.bag_id == parallel.bag_id
        torch.testing.assert_close(serial.instances, parallel.instances)
        torch.testing.assert_close(serial.mask, parallel.mask)
