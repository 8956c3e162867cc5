"""The CUDA fast path's logic, on CPU tensors: batch augmentation on the device, uint8 transfer,
channels-last and compiled encoders that keep checkpoints loadable."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from trainers import quiet_trainer

from lympho_mil.data import (
    Augmentation,
    BagBatch,
    CropSettings,
    LoaderSettings,
    PatientBagDataModule,
    collate_bags,
)
from lympho_mil.data.batch import BagSample
from lympho_mil.data.gpu_augment import (
    DIHEDRAL_MATRICES,
    DeviceAugment,
    random_warps,
    warp,
)
from lympho_mil.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BagToTensor
from lympho_mil.dihedral import stack_dihedral_views
from lympho_mil.models import AttentionMIL, InstanceMIL
from lympho_mil.nn import EncoderSettings

SIZE = 16
SMALL = EncoderSettings("small_cnn", out_dim=8, kwargs={"width": 8})


def pixels(b: int = 3, n: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n, 3, size, size), generator=generator, dtype=torch.uint8)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_views(theta: torch.Tensor) -> torch.Tensor:
    """``theta[..., 2, 3]`` -> bool[M, 8]: which dihedral matrix each linear part is."""
    matrices = torch.tensor(DIHEDRAL_MATRICES, dtype=theta.dtype)
    return (theta[..., :2].reshape(-1, 1, 2, 2) == matrices).flatten(2).all(-1)


def test_random_warps_draw_every_dihedral_view_and_warp_a_share() -> None:
    theta = random_warps((8, 50), affine=0.0, generator=seeded(0))
    assert theta.shape == (8, 50, 2, 3) and (theta[..., 2] == 0).all()  # no shift
    views = as_views(theta)
    assert (views.sum(1) == 1).all()  # each crop gets exactly one view
    assert views.sum(0).min() > 25  # 400 crops over 8 views: about 50 each
    assert torch.equal(random_warps((8, 50), affine=0.0, generator=seeded(0)), theta)
    assert not torch.equal(random_warps((8, 50), affine=0.0, generator=seeded(1)), theta)
    plain = random_warps((8, 50), dihedral=False, affine=0.0, generator=seeded(0))
    assert as_views(plain)[:, 0].all()  # the identity
    half = random_warps((4, 25), affine=0.5, generator=seeded(1))
    warped = ~as_views(half).any(1)
    assert 20 < warped.sum() < 80  # about half of 100 crops
    zoom = torch.linalg.det(half[..., :2].flatten(0, 1)[warped]).abs().rsqrt()
    assert ((zoom > 0.9 - 1e-6) & (zoom < 1.1 + 1e-6)).all()
    assert (half[..., 2].abs() <= 0.1 + 1e-6).all()  # shifts up to 5 % of the side


def test_a_dihedral_warp_moves_pixels_exactly_up_to_rounding() -> None:
    x = pixels(b=2, n=1, size=16).float().expand(2, 8, 3, 16, 16)
    matrices = torch.tensor(DIHEDRAL_MATRICES, dtype=torch.float32)
    theta = torch.cat([matrices, torch.zeros(8, 2, 1)], -1).expand(2, 8, 2, 3)
    out = warp(x, theta)
    for b in range(2):
        views = stack_dihedral_views(x[b, :1])[0]  # [8, C, H, W]
        error = (out[b].unsqueeze(1) - views).abs().flatten(2).amax(-1)  # [matrix, view]
        assert (error.min(1).values < 0.05).all()  # each matrix gives a view, to 0.05 / 255
        assert len(set(error.argmin(1).tolist())) == 8  # all eight of them
    ones = torch.ones(1, 50, 3, 16, 16)
    rotated = warp(ones, random_warps((1, 50), affine=1.0, generator=seeded(0)))
    assert rotated.min() >= 0 and rotated.max() <= 1 + 1e-6
    assert (rotated[0, :, 0, 0, 0] < 0.5).float().mean() > 0.3  # corners leave rotated crops


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
    views = stack_dihedral_views(evaluated[mask])
    error = (views - flipped[mask].unsqueeze(1)).abs().flatten(2).amax(-1)  # [crop, view]
    assert (error.min(1).values < 1e-3).all()  # each crop is one of its views (up to rounding)
    disabled = DeviceAugment(IMAGENET_MEAN, IMAGENET_STD, False, affine=0.0, color_p=0.0)
    assert torch.equal(disabled(raw, mask, train=True, generator=seeded(0)), evaluated)
    with pytest.raises(ValueError, match="mean"):
        DeviceAugment((0.5, 0.5, 255.0), IMAGENET_STD)
    with pytest.raises(ValueError, match="square"):
        augment(raw[..., :4], mask, train=True, generator=seeded(0))
    with pytest.raises(ValueError, match="square"):  # an affine warp alone too
        DeviceAugment(IMAGENET_MEAN, IMAGENET_STD, False)(raw[..., :4], mask, train=True)
    with pytest.raises(ValueError, match="uint8"):  # floats would be read on the wrong scale
        augment(raw.float() / 255, mask, train=True, generator=seeded(0))
    with pytest.raises(ValueError, match="3 channel"):
        DeviceAugment((0.5, 0.5), (0.2, 0.2))


def test_device_colour_jitter_scales_a_share_of_the_crops_each_by_its_own_factor() -> None:
    raw = pixels(b=4, n=25).clamp(20, 180)  # 1.3 x 180 < 255: never clamped
    mask = torch.ones(4, 25, dtype=torch.bool)
    bright = DeviceAugment((0, 0, 0), (1, 1, 1), False, 0.0, 0.3, 0.0, 0.0, color_p=0.5)
    out = bright(raw, mask, train=True, generator=seeded(0))
    ratios = out * 255 / raw.float()  # [B, N, C, H, W]
    per_crop = ratios.flatten(2)
    torch.testing.assert_close(per_crop.amin(-1), per_crop.amax(-1))  # one factor per crop
    factors = per_crop[..., 0]
    assert ((factors > 0.7 - 1e-5) & (factors < 1.3 + 1e-5)).all()
    unchanged = (factors - 1).abs() < 1e-6
    assert 20 < unchanged.sum() < 80 and len(set(factors.flatten().round(decimals=4).tolist())) > 30
    assert torch.equal(bright(raw, mask, train=True, generator=seeded(0)), out)
    grey = torch.full((1, 3, 3, 4, 4), 100, dtype=torch.uint8)
    saturated = DeviceAugment((0, 0, 0), (1, 1, 1), False, 0.0, 0.0, 0.0, 0.5, color_p=1.0)
    grey_out = saturated(grey, torch.ones(1, 3, dtype=torch.bool), True, seeded(0))
    torch.testing.assert_close(grey_out, grey.float() / 255)  # saturation keeps grey


@pytest.fixture
def gpu_dm(synthetic_dlmi: Path) -> PatientBagDataModule:
    return PatientBagDataModule(
        str(synthetic_dlmi),
        crops=CropSettings(image_size=SIZE),
        augment=Augmentation(mode="gpu"),
        loader=LoaderSettings(batch_size=3),
        max_instances=4,
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
        PatientBagDataModule(str(gpu_dm.source.root), augment={"mode": "cuda"})  # type: ignore[arg-type]


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


def fit_recording(
    dm: PatientBagDataModule, epochs: int, precision: str = "32-true"
) -> tuple[list[torch.Tensor], list[bool]]:
    """Fit a tiny model; the instances of every training step and the hook's train flags."""
    L.seed_everything(0, verbose=False)
    spy = TrainFlags(dm.device_augment)
    dm.__dict__["device_augment"] = spy
    model = AttentionMIL(encoder=SMALL, tabular_dim=dm.tabular_dim)
    recorder = Recorder()
    quiet_trainer(
        max_epochs=epochs,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[recorder],
        precision=precision,
    ).fit(model, dm)
    return recorder.seen, spy.flags


def test_trainer_applies_the_hook_repeatably(synthetic_dlmi: Path) -> None:
    def make() -> PatientBagDataModule:
        return PatientBagDataModule(
            str(synthetic_dlmi),
            crops=CropSettings(image_size=SIZE),
            augment=Augmentation(mode="gpu"),
            loader=LoaderSettings(batch_size=3),
            max_instances=4,
        )

    first, flags = fit_recording(make(), epochs=1)
    second, _ = fit_recording(make(), epochs=1)
    assert all(x.dtype == torch.float32 and x.dim() == 5 for x in first)
    assert flags == [True] * len(first)  # training steps only: eval loaders ship floats
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_the_hook_hands_over_crops_in_the_trainers_precision(gpu_dm: PatientBagDataModule) -> None:
    """bf16-true: Lightning converts a batch before the transfer hooks, when these crops are
    still uint8; the hook converts the float crops it makes (the model's weights are bf16)."""
    seen, _ = fit_recording(gpu_dm, epochs=1, precision="bf16-true")
    assert seen and all(x.dtype == torch.bfloat16 for x in seen)


def test_a_second_fit_draws_as_a_fresh_run(synthetic_dlmi: Path) -> None:
    def make() -> PatientBagDataModule:
        return PatientBagDataModule(
            str(synthetic_dlmi),
            crops=CropSettings(image_size=SIZE),
            augment=Augmentation(mode="gpu"),
            loader=LoaderSettings(batch_size=3),
            max_instances=4,
        )

    dm = make()
    first, _ = fit_recording(dm, epochs=1)
    again, _ = fit_recording(dm, epochs=1)  # the same datamodule, epoch 0 again
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_each_ddp_process_draws_its_own_augmentation(gpu_dm: PatientBagDataModule) -> None:
    draws = []
    for rank in (0, 1):
        gpu_dm.trainer = types.SimpleNamespace(global_rank=rank)  # type: ignore[assignment]
        gpu_dm._generator = None
        generator = gpu_dm._epoch_generator(torch.device("cpu"), epoch=0)
        draws.append(torch.rand(4, generator=generator))
    gpu_dm.trainer = None
    assert not torch.equal(draws[0], draws[1])


def test_cache_on_device_ships_rows_and_trains_on_the_same_pixels(synthetic_dlmi: Path) -> None:
    def make(cache_on_device: bool) -> PatientBagDataModule:
        return PatientBagDataModule(
            str(synthetic_dlmi),
            crops=CropSettings(image_size=SIZE),
            augment=Augmentation(mode="gpu", cache_on_device=cache_on_device),
            loader=LoaderSettings(batch_size=3),
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
        PatientBagDataModule(
            str(synthetic_dlmi),
            augment={"mode": "cpu", "cache_on_device": True},  # type: ignore[arg-type]
        )


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
    torch.manual_seed(0)
    plain = model_cls(encoder=SMALL).eval()
    fast = model_cls(encoder=dataclasses.replace(SMALL, channels_last=True)).eval()
    fast.load_state_dict(plain.state_dict())  # keys and shapes are the same
    conv = fast.net.encoder.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(fast(batch).logit, plain(batch).logit, rtol=1e-4, atol=1e-5)
    seen: list[bool] = []
    fast.net.encoder.features[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        fast(batch)
    assert seen and all(seen)
    identity = EncoderSettings("identity", in_dim=4, channels_last=True)  # 2-D: unaffected
    assert model_cls(encoder=identity).net.encoder(torch.ones(2, 4)).shape == (2, 4)


def test_compiled_encoder_keeps_state_dict_keys() -> None:
    plain = AttentionMIL(encoder=SMALL)
    compiled = AttentionMIL(encoder=dataclasses.replace(SMALL, compile=True))
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    compiled.load_state_dict(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())
    assert compiled.hparams["encoder"]["compile"] and not plain.hparams["encoder"]["compile"]


@pytest.mark.slow
def test_compiled_encoder_computes_the_same_outputs() -> None:
    torch.manual_seed(0)
    plain = AttentionMIL(encoder=SMALL).eval()
    compiled = AttentionMIL(encoder=dataclasses.replace(SMALL, compile=True)).eval()
    compiled.load_state_dict(plain.state_dict())
    batch = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch).logit, plain(batch).logit, rtol=1e-4, atol=1e-5)


# -- transfer -----------------------------------------------------------------------------------
def test_batches_are_copied_without_blocking_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Trainer does with a batch: non-blocking tensor copies to CUDA, plain to the CPU."""
    model = AttentionMIL(encoder=EncoderSettings("identity", in_dim=4))
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
    model = AttentionMIL(encoder=SMALL)
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
