"""The CUDA paths on a real GPU: mixed-precision training fed by the uint8 pipeline, batch
augmentation on the device, torch.compile and chunked evaluation memory.

Skipped without CUDA (CI has none); tests/test_gpu_path.py covers the same logic on the CPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch

from lympho_mil.data import (
    Augmentation,
    BagSample,
    CropSettings,
    LoaderSettings,
    PatientBagDataModule,
    collate_bags,
)
from lympho_mil.data.gpu_augment import DeviceAugment, normalize_pixels
from lympho_mil.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lympho_mil.models import AttentionMIL, OptimSettings
from lympho_mil.nn import EncoderSettings, MorphologyEncoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = EncoderSettings("small_cnn", out_dim=16, kwargs={"width": 8})


def pixels(b: int = 3, n: int = 5, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (b, n, 3, size, size), dtype=torch.uint8, device="cuda")


class Devices(L.Callback):
    """Records the model's device and the dtype and device of every training batch."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, torch.dtype, str]] = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.seen.add((module.device.type, batch.instances.dtype, batch.instances.device.type))


@pytest.mark.parametrize(
    ("precision", "cache_on_device"), [("16-mixed", False), ("bf16-mixed", True)]
)
def test_mixed_precision_training_on_the_device_pipeline(
    synthetic_dlmi: Path, tmp_path: Path, precision: str, cache_on_device: bool
) -> None:
    dm = PatientBagDataModule(
        str(synthetic_dlmi),
        crops=CropSettings(image_size=32),
        augment=Augmentation(mode="gpu", cache_on_device=cache_on_device),
        loader=LoaderSettings(
            batch_size=4, num_workers=2, pin_memory=True, persistent_workers=True
        ),
        max_instances=8,
    )
    L.seed_everything(0, verbose=False)
    fast = dataclasses.replace(SMALL, channels_last=True)
    model = AttentionMIL(encoder=fast, optim=OptimSettings(lr=3e-3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    devices = Devices()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_epochs=3,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[devices],
    )
    trainer.fit(model, dm)
    assert devices.seen == {("cuda", torch.float32, "cuda")}  # the model sees normalised floats
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v.cpu(), start[k])]
    assert any(k.startswith("net.encoder") for k in moved) and any("pool" in k for k in moved)
    # the checkpoint predicts on the CPU as the trained model does on the GPU
    on_cpu = AttentionMIL.load_from_checkpoint(
        trainer.checkpoint_callback.best_model_path, map_location="cpu"
    ).eval()
    batch = next(iter(dm.val_dataloader()))
    model.cuda().eval()  # the Trainer hands the model back on the CPU
    with torch.no_grad():
        gpu_logit = model(batch.to("cuda")).logit.float().cpu()
        torch.testing.assert_close(on_cpu(batch).logit, gpu_logit, rtol=1e-2, atol=1e-2)  # TF32


def test_device_augment_on_cuda_is_repeatable_masked_and_normalises_as_the_cpu() -> None:
    x = pixels()
    mask = torch.ones(3, 5, dtype=torch.bool, device="cuda")
    mask[1, 3:] = False
    augment = DeviceAugment(IMAGENET_MEAN, IMAGENET_STD)

    def draw() -> torch.Tensor:
        generator = torch.Generator("cuda").manual_seed(7)
        return augment(x, mask, train=True, generator=generator)

    first, second = draw(), draw()
    assert first.is_cuda and first.dtype == torch.float32 and torch.equal(first, second)
    assert (first[~mask] == 0).all() and not torch.equal(first[mask], draw_plain(x)[mask])
    evaluated = augment(x, mask, train=False)
    torch.testing.assert_close(evaluated.cpu()[mask.cpu()], draw_plain(x).cpu()[mask.cpu()])


def draw_plain(x: torch.Tensor) -> torch.Tensor:
    """The CPU normalisation of ``x`` (no augmentation), moved to ``x``'s device."""
    return normalize_pixels(x.cpu(), IMAGENET_MEAN, IMAGENET_STD).to(x.device)


@pytest.mark.slow
def test_compiled_encoder_on_cuda_matches_and_its_checkpoint_loads_uncompiled() -> None:
    torch.manual_seed(0)
    plain = AttentionMIL(encoder=SMALL).cuda().eval()
    compiled = AttentionMIL(encoder=dataclasses.replace(SMALL, compile=True)).cuda().eval()
    compiled.load_state_dict(plain.state_dict())
    batch = collate_bags(
        [
            BagSample(torch.randn(3 + i, 3, 32, 32), torch.zeros(0), 1.0, f"b{i}", ["x"] * (3 + i))
            for i in range(2)
        ]
    ).to("cuda")
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch).logit, plain(batch).logit, rtol=1e-2, atol=1e-3)
    reloaded = AttentionMIL(encoder=SMALL).cuda().eval()
    reloaded.load_state_dict(compiled.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logit, plain(batch).logit)


def test_chunked_evaluation_bounds_cuda_memory() -> None:
    crops = torch.randn(200, 3, 224, 224)
    batch = collate_bags([BagSample(crops, torch.zeros(0), 1.0, "b", ["x"] * 200)]).to("cuda")

    def peak_mib(chunk: int) -> float:
        model = AttentionMIL(encoder=EncoderSettings("resnet18"), chunk_size=chunk).cuda().eval()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            logit = model(batch).logit
        assert torch.isfinite(logit).all()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    small, whole = peak_mib(8), peak_mib(200)
    assert small < whole / 4, (small, whole)


def test_morphology_features_on_cuda_match_the_cpu() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    encoder = MorphologyEncoder()
    on_cpu = encoder(x)
    torch.testing.assert_close(encoder.cuda()(x.cuda()).cpu(), on_cpu, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_pretraining_runs_on_the_gpu_and_returns_a_cpu_encoder(method: str) -> None:
    """`lympho-mil pretrain --pretrain.device cuda`'s path: the encoder and the views on the
    device (SimCLR, and DINO with its teacher), the loss finite, the encoder handed back on
    the CPU in eval mode."""
    from lympho_mil.features.pretrain import PretrainSettings, pretrain_encoder

    crops = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8).numpy()
    settings = PretrainSettings(
        epochs=2, warmup_epochs=0, batch_size=16, width=8, out_dim=16, method=method
    )
    encoder, losses = pretrain_encoder(crops, settings, IMAGENET_MEAN, IMAGENET_STD, "cuda")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not encoder.training
    assert all(p.device.type == "cpu" for p in encoder.parameters())
