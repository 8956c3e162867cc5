"""The whole networks of ``lympho_mil.nn``: plain PyTorch (Lightning never imported), one output
type, the shapes their docstrings give; each LightningModule holds one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lympho_mil import nn as lnn
from lympho_mil.models import (
    AttentionMIL,
    GatedFusionMIL,
    InstanceMIL,
    LogitSumMIL,
    StatisticsPoolMIL,
    TabularMLP,
)
from lympho_mil.nn import (
    AttentionPooling,
    BagOutput,
    EncoderSettings,
    FeatureColumns,
    GatedFusion,
    GatedFusionNet,
    InstanceNet,
    LogitSumNet,
    MeanPooling,
    MILNet,
    MLPEncoder,
    SmallCNN,
    Standardize,
    TabularNet,
    bce_with_logits,
)

B, N, T = 3, 5, 3

PLAIN_TORCH_LOOP = """
import sys
import torch
from lympho_mil.nn import (
    AttentionPooling, ConcatFusion, GatedFusion, GatedFusionNet, InstanceNet, LogitSumNet,
    MeanPooling, MILNet, MLPEncoder, SmallCNN, Standardize, TabularNet, bce_with_logits,
    crop_bce,
)
torch.manual_seed(0)
B, N, T = 3, 5, 3
crops, mask = torch.randn(B, N, 3, 16, 16), torch.ones(B, N, dtype=torch.bool)
mask[1, 3:] = False
tabular, label = torch.randn(B, T), torch.tensor([1.0, 0.0, 1.0])
standardize = Standardize([0.0] * T, [1.0] * T)
nets = {
    "MILNet": MILNet(SmallCNN(width=8, out_dim=16), AttentionPooling(16, hidden=8)),
    "InstanceNet": InstanceNet(SmallCNN(width=8, out_dim=16)),
    "TabularNet": TabularNet(standardize, MLPEncoder(T, 8, 4)),
    "GatedFusionNet": GatedFusionNet(
        SmallCNN(width=8, out_dim=16), MeanPooling(), standardize, MLPEncoder(T, 8, 4),
        GatedFusion(16, 4),
    ),
    "ConcatFusionNet": GatedFusionNet(
        SmallCNN(width=8, out_dim=16), AttentionPooling(16), standardize, MLPEncoder(T, 8, 4),
        ConcatFusion(16, 4),
    ),
    "LogitSumNet": LogitSumNet(
        TabularNet(standardize, MLPEncoder(T, 8, 4)),
        {"cells": MILNet(SmallCNN(width=8, out_dim=16), MeanPooling())},
    ),
}
for name, net in nets.items():
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    out = net(crops, mask, tabular)
    loss = bce_with_logits(out.logit, label)
    if out.instance_logits is not None and name == "InstanceNet":
        loss = crop_bce(out.instance_logits, label, mask)
    loss.backward()
    optimizer.step()
    assert out.logit.shape == (B,), name
    if out.weights is not None:
        assert out.weights.shape == (B, N) and out.weights[1, 3:].eq(0).all(), name
    print(name, type(out).__name__, sorted(out.extras or {}))
print("lightning loaded:", any(m.split(".")[0] == "lightning" for m in sys.modules))
"""


def test_the_networks_train_in_a_plain_torch_loop_without_lightning() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_TORCH_LOOP], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "lightning loaded: False"
    assert lines[:-1] == [
        "MILNet BagOutput []",
        "InstanceNet BagOutput []",
        "TabularNet BagOutput []",
        "GatedFusionNet BagOutput ['gate', 'image_logit', 'tabular_logit']",
        "ConcatFusionNet BagOutput []",
        "LogitSumNet BagOutput ['cells_logit', 'image_logit', 'tabular_logit']",
    ]


def test_lympho_mil_nn_exports_a_network_per_model_family() -> None:
    nets = sorted(name for name in lnn.__all__ if name.endswith("Net"))
    assert nets == ["GatedFusionNet", "InstanceNet", "LogitSumNet", "MILNet", "TabularNet"]


@pytest.mark.parametrize(
    ("model", "net_class"),
    [
        (AttentionMIL(encoder=EncoderSettings("identity", in_dim=4)), MILNet),
        (StatisticsPoolMIL(encoder=EncoderSettings("identity", in_dim=4)), MILNet),
        (InstanceMIL(encoder=EncoderSettings("identity", in_dim=4)), InstanceNet),
        (TabularMLP(tabular_dim=T), TabularNet),
        (
            GatedFusionMIL(encoder=EncoderSettings("identity", in_dim=4), tabular_dim=T),
            GatedFusionNet,
        ),
        (LogitSumMIL(in_dim=4, cell_types=2, tabular_dim=T), LogitSumNet),
    ],
    ids=lambda x: type(x).__name__,
)
def test_each_model_holds_one_network_and_forwards_through_it(model, net_class) -> None:  # type: ignore[no-untyped-def]
    """Every parameter of the model is its network's (the threshold and the metrics own no
    parameter), and the model's forward is the network's."""
    from lympho_mil.data.batch import BagBatch

    assert isinstance(model.net, net_class)
    assert [id(p) for p in model.parameters()] == [id(p) for p in model.net.parameters()]
    torch.manual_seed(0)
    mask = torch.ones(B, N, dtype=torch.bool)
    batch = BagBatch(
        torch.randn(B, N, 4), mask, torch.randn(B, T), torch.ones(B), list("abc"), [["x"] * N] * B
    )
    model.eval()
    got, expected = model(batch), model.net(batch.instances, batch.mask, batch.tabular)
    assert isinstance(got, BagOutput)
    torch.testing.assert_close(got.logit, expected.logit)


def test_mean_pooling_weights_are_uniform_and_max_pooling_credits_holders() -> None:
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, False]])
    x = torch.randn(1, 3, 3, 16, 16)
    out = MILNet(SmallCNN(width=8, out_dim=4), MeanPooling())(x, mask)
    assert out.weights is not None and out.weights.tolist() == [[0.5, 0.5, 0.0]]
    net = MILNet(SmallCNN(width=8, out_dim=4), AttentionPooling(4, hidden=4))
    assert net(x, mask).weights[0, 2] == 0  # type: ignore[index]


def test_gated_fusion_net_reads_the_raw_clinical_vector_through_its_standardisation() -> None:
    torch.manual_seed(0)
    stats = Standardize([10.0, 0.0, 1.0], [2.0, 1.0, 4.0])
    net = GatedFusionNet(
        SmallCNN(width=8, out_dim=4), MeanPooling(), stats, MLPEncoder(T, 8, 4), GatedFusion(4, 4)
    ).eval()
    x, mask, raw = (
        torch.randn(2, 3, 3, 16, 16),
        torch.ones(2, 3, dtype=torch.bool),
        torch.randn(2, T),
    )
    z_tab = net.tabular_encoder((raw - stats.mean) / stats.scale)
    z_img = net.encode(x, mask).mean(1)
    torch.testing.assert_close(net(x, mask, raw).logit, net.fusion(z_img, z_tab).logit)
    assert torch.isfinite(bce_with_logits(net(x, mask, raw).logit, torch.ones(2)))


def test_logit_sum_adds_the_clinical_logit_to_the_mean_of_the_image_experts() -> None:
    """Each expert is the network it was given, run alone on its own columns; the patient
    logit is the clinical logit plus the mean image logit, padding never counted."""
    torch.manual_seed(0)
    clinical = TabularNet(Standardize([1.0] * T, [2.0] * T), MLPEncoder(T, 8, 4))
    images = {
        "features": MILNet(FeatureColumns(0, 3), MeanPooling()),
        "types": MILNet(FeatureColumns(3, 5), MeanPooling()),
    }
    net = LogitSumNet(clinical, images).eval()
    x, tabular = torch.randn(2, 4, 5), torch.randn(2, T)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    x[1, 2:] = float("nan")  # padding
    out = net(x, mask, tabular)
    alone = {name: expert(x, mask).logit for name, expert in images.items()}
    clean = x[1:, :2]
    torch.testing.assert_close(
        alone["types"][1], images["types"].head(clean[0, :, 3:].mean(0, keepdim=True))[0, 0]
    )
    expected = clinical(x, mask, tabular).logit + (alone["features"] + alone["types"]) / 2
    torch.testing.assert_close(out.logit, expected)
    assert out.extras is not None
    torch.testing.assert_close(out.extras["types_logit"], alone["types"])
    assert torch.isfinite(out.logit).all()
    assert out.weights is not None and out.weights[1].tolist() == [0.5, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="at least one image expert"):
        LogitSumNet(clinical, {})
    with pytest.raises(ValueError, match="may not be named 'tabular'"):
        LogitSumNet(clinical, {"tabular": images["types"]})
    with pytest.raises(ValueError, match="start < stop"):
        FeatureColumns(3, 3)
