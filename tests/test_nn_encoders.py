"""Instance encoders, the encoder factory, freezing and ``encode_instances``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import Tensor, nn

from lympho_mil.arguments import SettingError
from lympho_mil.nn.encoders import (
    EncoderWeightsError,
    IdentityEncoder,
    LeNetEncoder,
    MLPEncoder,
    SmallCNN,
    TimmEncoder,
    build_instance_encoder,
    encode_instances,
    freeze,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class CountingEncoder(nn.Module):
    """Wraps an encoder and records the batch size of every call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize(
    ("encoder", "x", "out_dim"),
    [
        (SmallCNN(in_chans=3, width=8, out_dim=16), torch.randn(2, 3, 28, 28), 16),
        (SmallCNN(in_chans=1, width=8, out_dim=16), torch.randn(2, 1, 45, 61), 16),
        (LeNetEncoder(), torch.randn(2, 1, 28, 28), 500),
        (MLPEncoder(10, hidden=12, out_dim=6), torch.randn(2, 10), 6),
        (IdentityEncoder(10), torch.randn(2, 10), 10),
    ],
)
def test_builtin_output_shapes(encoder: nn.Module, x: Tensor, out_dim: int) -> None:
    assert encoder.out_dim == out_dim
    assert encoder(x).shape == (2, out_dim)


def test_small_cnn_has_no_batchnorm() -> None:
    modules = list(SmallCNN().modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert any(isinstance(m, nn.GroupNorm) for m in modules)


def test_factory_builtins() -> None:
    assert isinstance(build_instance_encoder("small_cnn", out_dim=8, width=8), SmallCNN)
    assert build_instance_encoder("lenet", out_dim=20).out_dim == 20
    assert build_instance_encoder("mlp", in_dim=10, out_dim=4).out_dim == 4
    assert build_instance_encoder("identity", in_dim=10).out_dim == 10
    with pytest.raises(ValueError, match="in_dim"):
        build_instance_encoder("mlp")


def test_factory_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"not_a_model.*small_cnn.*lenet.*mlp.*identity"):
        build_instance_encoder("not_a_model")


def test_factory_timm_resnet18() -> None:
    encoder = build_instance_encoder("resnet18")
    assert isinstance(encoder, TimmEncoder) and encoder.out_dim == 512
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_timm_pretrained_without_weights_refuses_to_download() -> None:
    with pytest.raises(RuntimeError, match="weights_path"):
        build_instance_encoder("resnet18", pretrained=True)


def test_timm_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match=r"absent\.pt"):
        TimmEncoder("resnet18", pretrained=True, weights_path=str(path))


def test_timm_weights_round_trip_with_classifier_head(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", num_classes=7).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)  # includes the classifier head fc.*
    encoder = TimmEncoder("resnet18", pretrained=True, weights_path=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        torch.testing.assert_close(encoder(x), expected)
        assert not torch.allclose(TimmEncoder("resnet18").eval()(x), expected)


def test_timm_weights_with_missing_or_mismatched_backbone_keys(tmp_path: Path) -> None:
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    del state["layer1.0.conv1.weight"]
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(EncoderWeightsError, match=r"layer1\.0\.conv1\.weight.*conv1\.weight"):
        TimmEncoder("resnet18", weights_path=str(path))


def test_freeze_stops_grads_and_survives_train() -> None:
    encoder = build_instance_encoder("resnet18")
    freeze(encoder)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # as Lightning does at each epoch
    x = torch.randn(2, 3, 32, 32)
    before = encoder.model.bn1.running_mean.clone()
    out = encoder(x)
    assert not encoder.training and not encoder.model.bn1.training
    torch.testing.assert_close(encoder.model.bn1.running_mean, before)
    assert not out.requires_grad


def padded_bags(sizes: list[int], shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Random ``instances[B, N, *shape]`` with NaN padding and ``mask[B, N]``."""
    n_max = max(sizes) + 1
    instances = torch.randn(len(sizes), n_max, *shape)
    mask = torch.arange(n_max) < torch.tensor(sizes).unsqueeze(1)
    instances[~mask] = float("nan")
    return instances, mask


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_encode_instances_matches_per_bag_encoding(chunk_size: int | None) -> None:
    encoder = CountingEncoder(SmallCNN(in_chans=1, width=8, out_dim=6).eval())
    sizes = [2, 5, 1]
    instances, mask = padded_bags(sizes, (1, 28, 28))
    h = encode_instances(encoder, instances, mask, chunk_size=chunk_size)
    assert h.shape == (3, 6, 6)
    assert sum(encoder.calls) == sum(sizes)
    assert max(encoder.calls) <= (chunk_size or sum(sizes))
    assert (h[~mask] == 0).all()
    with torch.no_grad():
        for b, n in enumerate(sizes):
            torch.testing.assert_close(h[b, :n], encoder.inner(instances[b, :n]))


def test_encode_instances_gradients_and_frozen_chunks() -> None:
    instances, mask = padded_bags([3, 1], (5,))
    trainable = MLPEncoder(5, hidden=8, out_dim=4)
    encode_instances(trainable, instances, mask, chunk_size=2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in trainable.parameters())
    frozen = MLPEncoder(5, hidden=8, out_dim=4)
    freeze(frozen)
    h = encode_instances(frozen, instances, mask, chunk_size=2)
    assert h.shape == (2, 4, 4) and not h.requires_grad


def test_encode_instances_follows_encoder_dtype_under_autocast() -> None:
    instances, mask = padded_bags([2, 3], (5,))
    encoder = MLPEncoder(5, hidden=8, out_dim=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = encode_instances(encoder, instances, mask, chunk_size=2)
    assert h.dtype == torch.bfloat16 and (h[~mask] == 0).all()


def test_encode_instances_rejects_bad_chunk_size() -> None:
    instances, mask = padded_bags([2], (5,))
    with pytest.raises(ValueError, match="chunk_size"):
        encode_instances(IdentityEncoder(5), instances, mask, chunk_size=0)
    with pytest.raises(ValueError, match="shape_multiple"):
        encode_instances(IdentityEncoder(5), instances, mask, shape_multiple=0)


@pytest.mark.parametrize(
    ("sizes", "chunk_size", "calls"),
    [([2, 5, 1], 3, [4, 4, 4]), ([1], None, [4]), ([2, 3], 4, [4, 4]), ([4, 4], 4, [4, 4])],
)
def test_shape_multiple_tops_up_every_call_and_drops_the_repeats(
    sizes: list[int], chunk_size: int | None, calls: list[int]
) -> None:
    encoder = CountingEncoder(SmallCNN(in_chans=1, width=8, out_dim=6).eval())
    instances, mask = padded_bags(sizes, (1, 28, 28))
    plain = encode_instances(encoder.inner, instances, mask, chunk_size)
    h = encode_instances(encoder, instances, mask, chunk_size, shape_multiple=4)
    assert encoder.calls == calls
    torch.testing.assert_close(h, plain)  # eval mode: the repeats change nothing


def test_builtin_encoders_load_a_weights_file_strictly(tmp_path: Path) -> None:
    trained = build_instance_encoder("small_cnn", width=4, out_dim=8)
    path = tmp_path / "small_cnn.pt"
    torch.save(trained.state_dict(), path)
    loaded = build_instance_encoder("small_cnn", weights_path=str(path), width=4, out_dim=8)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    with pytest.raises(EncoderWeightsError, match="shape mismatches") as exc:  # another width
        build_instance_encoder("small_cnn", weights_path=str(path), width=8, out_dim=8)
    assert f"weights in {path} do not fit the 'small_cnn' encoder" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_instance_encoder("small_cnn", weights_path=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="pretrained applies to timm models"):
        build_instance_encoder("small_cnn", pretrained=True)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": {f"model.backbone.{k}": v for k, v in s.items()}},
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {"teacher": {f"backbone.{k}": v for k, v in s.items()}, "epoch": 3},
    ],
    ids=["lightning", "ddp", "dino"],
)
def test_wrapped_state_dicts_are_unwrapped(tmp_path: Path, wrap: Any) -> None:
    trained = build_instance_encoder("small_cnn", width=4, out_dim=8)
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(trained.state_dict()), path)
    loaded = build_instance_encoder("small_cnn", weights_path=str(path), width=4, out_dim=8)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_unexpected_keys_are_named_but_heads_are_ignored(tmp_path: Path) -> None:
    state = build_instance_encoder("small_cnn", width=4, out_dim=8).state_dict()
    path = tmp_path / "extra.pt"
    torch.save({**state, "dino_head.last_layer.weight": torch.zeros(3)}, path)
    build_instance_encoder("small_cnn", weights_path=str(path), width=4, out_dim=8)
    torch.save({**state, "adapter.weight": torch.zeros(3)}, path)
    with pytest.raises(EncoderWeightsError, match=r"1 unexpected keys \(e\.g\. adapter\.weight\)"):
        build_instance_encoder("small_cnn", weights_path=str(path), width=4, out_dim=8)


def test_dinov2_checkpoint_loads_into_timm_vit_at_the_crop_size(tmp_path: Path) -> None:
    """DinoBloom's layout: DINOv2 keys under teacher.backbone., a mask token, heads, 224 px."""
    source = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=224)
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["backbone.mask_token"] = torch.zeros(1, source.embed_dim)
    state["dino_head.mlp.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "dinobloom-s.pth"
    torch.save({"teacher": state}, path)
    encoder = build_instance_encoder(
        "vit_small_patch14_dinov2", pretrained=True, weights_path=str(path), img_size=56
    )
    assert encoder.out_dim == 384
    assert encoder.model.pos_embed.shape == (1, 1 + (56 // 14) ** 2, 384)  # resampled
    for name in ("blocks.11.attn.qkv.weight", "cls_token", "norm.weight"):
        torch.testing.assert_close(encoder.model.state_dict()[name], source.state_dict()[name])
    assert encoder(torch.randn(2, 3, 56, 56)).shape == (2, 384)


def test_timm_encoder_kwargs_pass_through_or_are_named() -> None:
    vit = build_instance_encoder("vit_tiny_patch16_224", img_size=64)
    assert vit(torch.randn(1, 3, 64, 64)).shape == (1, vit.out_dim)
    with pytest.raises(SettingError, match=r"does not take encoder_kwargs.*'wingspan'"):
        build_instance_encoder("resnet18", wingspan=3)
