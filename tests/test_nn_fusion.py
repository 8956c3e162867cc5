"""Clinical standardisation/encoder, gated mixture-of-experts and concatenation fusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lympho_mil.nn import MLPEncoder, bce_with_logits
from lympho_mil.nn.fusion import ConcatFusion, FusionOutput, GatedFusion
from lympho_mil.nn.tabular import Standardize

B, DI, DT = 5, 6, 3


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_clinical_encoder_shape() -> None:
    encoder = MLPEncoder(4, hidden=8, out_dim=DT)
    assert encoder.out_dim == DT and encoder(torch.randn(B, 4)).shape == (B, DT)


def test_standardize_round_trip_and_state_dict() -> None:
    std = Standardize([1.0, -2.0, 10.0], [2.0, 0.5, 4.0])
    x = torch.tensor([[3.0, -2.0, 2.0], [1.0, -1.5, 10.0]])
    y = std(x)
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0, -2.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(y * std.scale + std.mean, x)
    state = std.state_dict()
    assert set(state) == {"mean", "scale"} and state["mean"].dtype == torch.float32
    restored = Standardize([0.0] * 3, [1.0] * 3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(x), y)


@pytest.mark.parametrize(
    ("mean", "scale", "match"),
    [([0.0, 0.0], [1.0, 0.0], "scale"), ([0.0], [-1.0], "scale"), ([0.0], [1.0, 1.0], "mean")],
)
def test_standardize_rejects_bad_parameters(
    mean: list[float], scale: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Standardize(mean, scale)


def test_standardize_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"3 clinical features.*got an input with 2"):
        Standardize([0.0] * 3, [1.0] * 3)(torch.zeros(B, 2))


def test_gated_fusion_shapes_and_mixture_formula() -> None:
    fusion = GatedFusion(DI, DT, hidden=8)
    out = fusion(torch.randn(B, DI), torch.randn(B, DT))
    assert isinstance(out, FusionOutput)
    for t in out:
        assert t.shape == (B,) and torch.isfinite(t).all()
    assert ((out.prob >= 0) & (out.prob <= 1)).all() and ((out.gate > 0) & (out.gate < 1)).all()
    g = out.gate
    expected = g * torch.sigmoid(out.image_logit) + (1 - g) * torch.sigmoid(out.tabular_logit)
    torch.testing.assert_close(out.prob, expected)
    torch.testing.assert_close(out.logit, torch.logit(expected), atol=1e-4, rtol=1e-4)


def test_gated_fusion_experts_are_linear_heads() -> None:
    fusion = GatedFusion(DI, DT)
    z_img, z_tab = torch.randn(B, DI), torch.randn(B, DT)
    out = fusion(z_img, z_tab)
    torch.testing.assert_close(out.image_logit, fusion.image_head(z_img).squeeze(-1))
    torch.testing.assert_close(out.tabular_logit, fusion.tabular_head(z_tab).squeeze(-1))


@pytest.mark.parametrize(
    ("bias", "expert"),
    [
        (50.0, "image_head"),
        (-50.0, "tabular_head"),
        (200.0, "image_head"),
        (-200.0, "tabular_head"),
    ],
)
@pytest.mark.parametrize("gate_input", ["embeddings", "confidence"])
def test_saturated_gate_keeps_loss_finite_and_expert_gradient(
    bias: float, expert: str, gate_input: str
) -> None:
    fusion = GatedFusion(DI, DT, hidden=8, gate_input=gate_input)  # type: ignore[arg-type]
    with torch.no_grad():
        fusion.gate[-1].weight.zero_()
        fusion.gate[-1].bias.fill_(bias)
    out = fusion(torch.randn(B, DI), torch.randn(B, DT))
    assert ((out.gate - (1.0 if bias > 0 else 0.0)).abs() < 1e-20).all()  # exact for |bias| 200
    for t in (out.logit, out.prob):
        assert torch.isfinite(t).all()
    loss = bce_with_logits(out.logit, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), pos_weight=2.0)
    assert torch.isfinite(loss)
    loss.backward()
    grad = getattr(fusion, expert).weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    for p in fusion.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_extreme_experts_give_finite_loss() -> None:
    fusion = GatedFusion(DI, DT)
    out = fusion(torch.randn(B, DI) * 1e4, torch.randn(B, DT) * 1e4)
    loss = bce_with_logits(out.logit, torch.ones(B))
    assert torch.isfinite(out.logit).all() and torch.isfinite(loss)


def test_bce_on_the_mixture_logit_equals_bce_on_prob() -> None:
    out = GatedFusion(DI, DT)(torch.randn(B, DI), torch.randn(B, DT))
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(bce_with_logits(out.logit, y), F.binary_cross_entropy(out.prob, y))
    weights = torch.where(y == 1, 3.0, 1.0)
    torch.testing.assert_close(
        bce_with_logits(out.logit, y, pos_weight=3.0),
        F.binary_cross_entropy(out.prob, y, weight=weights),
    )


def test_concat_fusion() -> None:
    fusion = ConcatFusion(DI, DT, hidden=8)
    out = fusion(torch.randn(B, DI), torch.randn(B, DT))
    assert out.logit.shape == (B,) and out.gate is None
    assert out.image_logit is None and out.tabular_logit is None
    torch.testing.assert_close(out.prob, torch.sigmoid(out.logit))
    assert torch.isfinite(bce_with_logits(out.logit, torch.ones(B)))


def test_fusion_under_bf16_autocast() -> None:
    z_img, z_tab = torch.randn(B, DI), torch.randn(B, DT)
    for fusion in (GatedFusion(DI, DT), ConcatFusion(DI, DT).eval()):
        ref = fusion(z_img, z_tab)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fusion(z_img, z_tab)
        assert out.logit.dtype == out.prob.dtype == torch.float32
        torch.testing.assert_close(out.prob, ref.prob, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("gate_input", ["embeddings", "confidence"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_fusion_in_another_parameter_dtype(gate_input: str, dtype: torch.dtype) -> None:
    """bf16-true or float64 parameters (e.g. ``Trainer(precision="bf16-true")``): both gates
    run, and agree with float32."""
    fusion = GatedFusion(DI, DT, gate_input=gate_input)  # type: ignore[arg-type]
    z_img, z_tab = torch.randn(B, DI), torch.randn(B, DT)
    ref = fusion(z_img, z_tab)
    out = fusion.to(dtype)(z_img.to(dtype), z_tab.to(dtype))
    torch.testing.assert_close(out.prob.float(), ref.prob, atol=3e-2, rtol=3e-2)


def test_confidence_gate_starts_with_the_more_confident_expert() -> None:
    """At start ``g = sigmoid(|s_img| - |s_tab|)``, so ``p`` sides with ``s_img + s_tab``."""
    fusion = GatedFusion(DI, DT, gate_input="confidence")
    out = fusion(torch.randn(64, DI) * 3, torch.randn(64, DT) * 3)
    s_img, s_tab = out.image_logit, out.tabular_logit
    torch.testing.assert_close(out.gate, torch.sigmoid(s_img.abs() - s_tab.abs()))
    disagree = (s_img > 0) != (s_tab > 0)
    assert disagree.sum() > 5
    assert torch.equal(out.logit > 0, s_img + s_tab > 0)


def test_confidence_gate_does_not_pull_on_the_experts() -> None:
    fusion = GatedFusion(DI, DT, gate_input="confidence")
    out = fusion(torch.randn(B, DI), torch.randn(B, DT))
    out.gate.sum().backward()
    assert fusion.image_head.weight.grad is None and fusion.tabular_head.weight.grad is None
    assert fusion.gate[0].weight.grad is not None and fusion.gate[0].weight.grad.abs().sum() > 0


def test_gate_input_is_checked() -> None:
    with pytest.raises(ValueError, match="gate_input"):
        GatedFusion(DI, DT, gate_input="logits")  # type: ignore[arg-type]
