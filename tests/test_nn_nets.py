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
    StatisticsPoolMIL,
    TabularMLP,
)
from lympho_mil.nn import (
    AttentionPooling,
    BagOutput,
    EncoderSettings,
    GatedFusion,
    GatedFusionNet,
    InstanceNet,
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
    AttentionPooling, ConcatFusion, GatedFusion, GatedFusionNet, InstanceNet, MeanPooling,
    MILNet, MLPEncoder, SmallCNN, Standardize, TabularNet, bce_with_logits, crop_bce,
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
    ]


def test_lympho_mil_nn_exports_a_network_per_model_family() -> None:
    nets = sorted(name for name in lnn.__all__ if name.endswith("Net"))
    assert nets == ["GatedFusionNet", "InstanceNet", "MILNet", "TabularNet"]


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
