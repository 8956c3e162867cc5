"""The CUDA fast path's logic, on CPU tensors: batch augmentation on the device, uint8 transfer,
channels-last and compiled encoders that keep checkpoints loadable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lympho_mil.data import BagBatch, PatientBagDataModule, collate_bags
from lympho_mil.data.batch import BagSample
from lympho_mil.data.gpu_augment import (
    DeviceAugment,
    color_jitter,
    dihedral,
    dihedral_views,
    random_affine,
    random_dihedral,
)
from lympho_mil.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BagToTensor
from lympho_mil.models import AttentionMIL, InstanceMIL

SIZE = 16


def pixels(b: int = 3, n: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n, 3, size, size), generator=generator, dtype=torch.uint8)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- dihedral views -----------------------------------------------------------------------------
def test_the_eight_views_are_distinct_pixel_permutations() -> None:
    x = torch.arange(2 * 3 * 4 * 4).view(2, 3, 4, 4)
    views = dihedral_views(x)
    assert views.shape == (2, 8, 3, 4, 4) and torch.equal(views[:, 0], x)
    assert len({tuple(v.flatten().tolist()) for v in views[0]}) == 8
    for v in range(8):
        assert torch.equal(views[:, v].flatten(-2).sort(-1).values, x.flatten(-2).sort(-1).values)
    assert torch.equal(dihedral(x, 1), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(dihedral(x, 4), x.flip(-1))
    with pytest.raises(ValueError, match=r"0\.\.7"):
        dihedral(x, 8)


def test_random_dihedral_draws_one_view_per_crop_uniformly() -> None:
    x = pixels(b=8, n=50)
    out = random_dihedral(x, seeded(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    views = dihedral_views(x.flatten(0, 1))  # [M, 8, C, H, W]
    same = (views == out.flatten(0, 1).unsqueeze(1)).flatten(2).all(-1)  # [M, 8]
    assert (same.sum(1) == 1).all()  # each crop is exactly one of its views
    counts = torch.bincount(same.float().argmax(1), minlength=8)
    assert counts.min() > 25  # 400 crops over 8 views: about 50 each
    assert torch.equal(random_dihedral(x, seeded(0)), out)
    assert not torch.equal(random_dihedral(x, seeded(1)), out)
    with pytest.raises(ValueError, match="square"):
        random_dihedral(x[..., :4], seeded(0))


# -- affine -------------------------------------------------------------------------------------
def test_random_affine_warps_a_share_of_the_crops() -> None:
    x = pixels(b=4, n=25, size=16).float() / 255
    assert torch.equal(random_affine(x, p=0.0, generator=seeded(0)), x)
    still = random_affine(x, p=1.0, scale=(1.0, 1.0), translate=0.0, degrees=0.0)
    torch.testing.assert_close(still, x, rtol=0, atol=1e-5)  # the identity warp
    ones = torch.ones(2, 50, 3, 16, 16)
    rotated = random_affine(ones, p=1.0, scale=(1.0, 1.0), translate=0.0, generator=seeded(0))
    assert rotated.min() >= 0 and rotated.max() <= 1 + 1e-6
    assert (rotated[..., 0, 0] < 0.5).float().mean() > 0.5  # corners leave the rotated crop
    half = random_affine(x, p=0.5, generator=seeded(1))
    untouched = (half == x).flatten(2).all(-1)
    assert 20 < untouched.sum() < 80  # about half of 100 crops
    assert torch.equal(random_affine(x, p=0.5, generator=seeded(1)), half)


# -- colour -------------------------------------------------------------------------------------
def test_color_jitter_is_per_crop_bounded_and_can_be_disabled() -> None:
    x = pixels(b=4, n=6).float() / 255
    assert torch.equal(color_jitter(x, 0.0, 0.0, 0.0, generator=seeded(0)), x)
    assert torch.equal(color_jitter(x, 0.3, 0.3, 0.3, p=0.0, generator=seeded(0)), x)
    out = color_jitter(x, 0.3, 0.3, 0.3, p=1.0, generator=seeded(0))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    brighter = color_jitter(x, brightness=0.3, contrast=0, saturation=0, generator=seeded(0))
    ratios = (brighter / x.clamp(min=1e-3)).flatten(2).median(-1).values  # [B, N]
    assert len(set(ratios.flatten().round(decimals=3).tolist())) > 10  # one factor per crop
    assert ((ratios > 0.69) & (ratios < 1.31)).all()
    half = color_jitter(x, 0.3, 0.3, 0.3, p=0.5, generator=seeded(0))
    untouched = (half == x).flatten(2).all(-1)
    assert 0 < untouched.sum() < untouched.numel()
    assert torch.equal(color_jitter(x, 0.3, 0.3, 0.3, generator=seeded(0)), out)


def test_grey_crops_keep_their_saturation() -> None:
    grey = torch.full((1, 2, 3, 4, 4), 0.4)
    out = color_jitter(grey, brightness=0, contrast=0, saturation=0.5, generator=seeded(0))
    torch.testing.assert_close(out, grey)


# -- the whole device pipeline ------------------------------------------------------------------
def test_device_augment_respects_the_mask_and_matches_the_cpu_normalisation() -> None:
    raw = pixels()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    raw[~mask] = 0  # what collate_bags pads with
    augment = DeviceAugment(IMAGENET_MEAN, IMAGENET_STD)
    on_cpu = BagToTensor(None, IMAGENET_MEAN, IMAGENET_STD)
    evaluated = augment(raw, mask, train=False)
    for b in range(3):
        n = int(mask[b].sum())
        crops = raw[b, :n].permute(0, 2, 3, 1).numpy()
        torch.testing.assert_close(evaluated[b, :n], on_cpu(crops, np.random.default_rng(0)))
    trained = augment(raw, mask, train=True, generator=seeded(0))
    assert trained.dtype == torch.float32
    assert (trained[~mask] == 0).all() and (evaluated[~mask] == 0).all()
    assert not torch.allclose(trained[mask], evaluated[mask])
    geometric = DeviceAugment(IMAGENET_MEAN, IMAGENET_STD, affine=0.0, color_p=0.0)
    flipped = geometric(raw, mask, train=True, generator=seeded(0))
    views = dihedral_views(evaluated[mask])
    assert (views == flipped[mask].unsqueeze(1)).flatten(2).all(-1).any(1).all()
    disabled = DeviceAugment(IMAGENET_MEAN, IMAGENET_STD, False, affine=0.0, color_p=0.0)
    assert torch.equal(disabled(raw, mask, train=True, generator=seeded(0)), evaluated)


@pytest.fixture
def gpu_dm(synthetic_dlmi: Path) -> PatientBagDataModule:
    return PatientBagDataModule(
        str(synthetic_dlmi), image_size=SIZE, augment="gpu", batch_size=3, max_instances=4
    )


def test_gpu_augment_loader_ships_uint8_for_training_only(gpu_dm: PatientBagDataModule) -> None:
    train = next(iter(gpu_dm.train_dataloader()))
    assert train.instances.dtype == torch.uint8 and train.instances.shape[2:] == (SIZE, SIZE, 3)
    assert next(iter(gpu_dm.val_dataloader())).instances.dtype == torch.float32
    normalised = gpu_dm.on_after_batch_transfer(train, 0)  # no trainer: not training
    dataset = gpu_dm.datasets["train"]
    bags = {bag.bag_id: bag for bag in dataset.bags}
    for i, bag_id in enumerate(train.bag_id):
        bag = bags[bag_id]
        rows = bag.rows[[bag.instance_ids.index(name) for name in train.instance_id[i]]]
        cached = dataset.store[rows]  # uint8[n, H, W, 3]
        assert torch.equal(train.instances[i, : len(rows)], torch.from_numpy(cached))
        expected = BagToTensor(None, IMAGENET_MEAN, IMAGENET_STD)(cached, np.random.default_rng())
        torch.testing.assert_close(normalised.instances[i, : len(rows)], expected)
    assert (normalised.instances[~train.mask] == 0).all()
    with pytest.raises(ValueError, match="augment"):
        PatientBagDataModule(str(gpu_dm.root), augment="cpu")  # type: ignore[arg-type]


class Recorder(L.Callback):
    """Keeps the instances each training step received (after the transfer hooks)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(batch.instances.clone())


class TrainFlags:
    """Wraps a DeviceAugment and records the ``train`` flag of every call."""

    def __init__(self, augment: DeviceAugment) -> None:
        self.augment, self.flags = augment, []

    def __call__(self, pixels, mask, train, generator=None):  # type: ignore[no-untyped-def]
        self.flags.append(train)
        return self.augment(pixels, mask, train, generator)


def fit_recording(dm: PatientBagDataModule, epochs: int) -> tuple[list[torch.Tensor], list[bool]]:
    """Fit a tiny model; the instances of every training step and the hook's train flags."""
    L.seed_everything(0, verbose=False)
    spy = TrainFlags(dm.device_augment)
    dm.__dict__["device_augment"] = spy
    model = AttentionMIL(
        encoder="small_cnn", encoder_kwargs={"width": 8}, embed_dim=8, tabular_dim=dm.tabular_dim
    )
    recorder = Recorder()
    L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    ).fit(model, dm)
    return recorder.seen, spy.flags


def test_trainer_applies_the_hook_repeatably(synthetic_dlmi: Path) -> None:
    def make() -> PatientBagDataModule:
        return PatientBagDataModule(
            str(synthetic_dlmi), image_size=SIZE, augment="gpu", batch_size=3, max_instances=4
        )

    first, flags = fit_recording(make(), epochs=1)
    second, _ = fit_recording(make(), epochs=1)
    assert all(x.dtype == torch.float32 and x.dim() == 5 for x in first)
    assert flags == [True] * len(first)  # training steps only: eval loaders ship floats
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_cache_on_device_ships_rows_and_trains_on_the_same_pixels(synthetic_dlmi: Path) -> None:
    def make(cache_on_device: bool) -> PatientBagDataModule:
        return PatientBagDataModule(
            str(synthetic_dlmi),
            image_size=SIZE,
            augment="gpu",
            cache_on_device=cache_on_device,
            batch_size=3,
            max_instances=4,
        )

    dm = make(True)
    rows = next(iter(dm.train_dataloader()))
    assert rows.instances.dtype == torch.int64 and rows.instances.shape == rows.mask.shape
    gathered, _ = fit_recording(dm, epochs=2)
    shipped, _ = fit_recording(make(False), epochs=2)
    assert len(gathered) == len(shipped) > 0
    assert all(torch.equal(a, b) for a, b in zip(gathered, shipped, strict=True))
    assert next(iter(dm.val_dataloader())).instances.dtype == torch.float32
    with pytest.raises(ValueError, match="cache_on_device"):
        PatientBagDataModule(str(synthetic_dlmi), augment=True, cache_on_device=True)


# -- model side: channels-last, torch.compile ---------------------------------------------------
def image_batch(n_bags: int = 2, size: int = 32) -> object:
    generator = torch.Generator().manual_seed(0)
    samples = [
        BagSample(
            torch.randn(3 + i, 3, size, size, generator=generator),
            torch.zeros(0),
            float(i % 2),
            f"b{i}",
            [str(k) for k in range(3 + i)],
        )
        for i in range(n_bags)
    ]
    return collate_bags(samples)


@pytest.mark.parametrize("model_cls", [AttentionMIL, InstanceMIL])
def test_channels_last_keeps_outputs_and_checkpoints(model_cls: type) -> None:
    settings = {"encoder": "small_cnn", "encoder_kwargs": {"width": 8}, "embed_dim": 8}
    torch.manual_seed(0)
    plain = model_cls(**settings).eval()
    fast = model_cls(**settings, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())  # keys and shapes are the same
    conv = fast.encoder.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(fast(batch).logit, plain(batch).logit, rtol=1e-4, atol=1e-5)
    seen: list[bool] = []
    fast.encoder.features[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        fast(batch)
    assert seen and all(seen)
    features = model_cls(encoder="identity", in_dim=4, channels_last=True)  # 2-D: unaffected
    assert features.encoder(torch.ones(2, 4)).shape == (2, 4)


def test_compiled_encoder_keeps_state_dict_keys() -> None:
    settings = {"encoder": "small_cnn", "encoder_kwargs": {"width": 8}, "embed_dim": 8}
    plain = AttentionMIL(**settings)
    compiled = AttentionMIL(**settings, compile_encoder=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    compiled.load_state_dict(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())
    assert compiled.hparams["compile_encoder"] and not plain.hparams["compile_encoder"]


@pytest.mark.slow
def test_compiled_encoder_computes_the_same_outputs() -> None:
    settings = {"encoder": "small_cnn", "encoder_kwargs": {"width": 8}, "embed_dim": 8}
    torch.manual_seed(0)
    plain = AttentionMIL(**settings).eval()
    compiled = AttentionMIL(**settings, compile_encoder=True).eval()
    compiled.load_state_dict(plain.state_dict())
    batch = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch).logit, plain(batch).logit, rtol=1e-4, atol=1e-5)


# -- transfer -----------------------------------------------------------------------------------
def test_batches_are_copied_without_blocking_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Trainer does with a batch: non-blocking tensor copies to CUDA, plain to the CPU."""
    model = AttentionMIL(encoder="identity", in_dim=4)
    batch = collate_bags([BagSample(torch.ones(2, 4), torch.zeros(0), 1.0, "b", ["0", "1"])])
    calls: list[tuple[str, bool]] = []

    def record(self, device, *args, non_blocking=False, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((torch.device(device).type, non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "to", record)
    for device in ("cuda", "cpu"):
        moved = model.transfer_batch_to_device(batch, torch.device(device), 0)
        assert isinstance(moved, BagBatch)
    assert calls == [("cuda", True)] * 4 + [("cpu", False)] * 4  # instances, mask, tabular, label


def test_raw_pixels_reaching_a_model_are_a_clear_error() -> None:
    model = AttentionMIL(encoder="small_cnn", encoder_kwargs={"width": 8}, embed_dim=8)
    raw = collate_bags(
        [
            BagSample(
                torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(0), 1.0, "b", ["0", "1"]
            )
        ]
    )
    with pytest.raises(TypeError, match="datamodule="):
        model.training_step(raw, 0)
    rows = dataclasses.replace(raw, instances=torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="row numbers"):
        model.training_step(rows, 0)
