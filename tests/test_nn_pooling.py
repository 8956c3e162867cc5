"""Mask-aware MIL pooling: padding, permutation and batching invariances, half precision."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lympho_mil.nn.pooling import (
    POOLINGS,
    AttentionPooling,
    GatedAttentionPooling,
    MaxPooling,
    MeanPooling,
    build_pooling,
)

DIM = 8
NAMES = sorted(POOLINGS)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=NAMES)
def pool(request: pytest.FixtureRequest) -> nn.Module:
    return build_pooling(request.param, DIM, hidden=16).eval()


def pad_with_junk(h: Tensor, n_total: int) -> tuple[Tensor, Tensor]:
    """One bag ``h[n, D]`` -> ``([1, n_total, D], mask[1, n_total])`` padded with junk."""
    junk = torch.randn(n_total - h.shape[0], h.shape[1]) * 1e3
    junk[0, 0], junk[-1, 1], junk[-1, 2] = float("nan"), float("inf"), float("-inf")
    mask = torch.arange(n_total) < h.shape[0]
    return torch.cat([h, junk]).unsqueeze(0), mask.unsqueeze(0)


def pool_alone(pool: nn.Module, h: Tensor) -> tuple[Tensor, Tensor | None]:
    """Pool one unpadded bag ``h[n, D]``."""
    z, a = pool(h.unsqueeze(0), torch.ones(1, h.shape[0], dtype=torch.bool))
    return z[0], None if a is None else a[0]


def padded_batch(bags: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Bags ``[n_b, D]`` -> junk-padded ``h[B, N, D]`` and ``mask[B, N]``."""
    n_max = max(b.shape[0] for b in bags) + 2
    padded = [pad_with_junk(b, n_max) for b in bags]
    return torch.cat([p[0] for p in padded]), torch.cat([p[1] for p in padded])


def test_registry_and_factory() -> None:
    assert set(POOLINGS) == {
        "mean",
        "max",
        "attention",
        "gated_attention",
        "distribution",
        "statistics",
    }
    assert isinstance(build_pooling("gated_attention", DIM), GatedAttentionPooling)
    assert isinstance(build_pooling("attention", DIM), AttentionPooling)
    assert not MeanPooling.has_attention and not MaxPooling.has_attention
    assert AttentionPooling(DIM).has_attention and GatedAttentionPooling(DIM).has_attention
    with pytest.raises(ValueError, match="gated_attention"):
        build_pooling("median", DIM)


def test_padding_with_junk_changes_nothing(pool: nn.Module) -> None:
    h = torch.randn(5, DIM)
    z_ref, a_ref = pool_alone(pool, h)
    hp, mask = pad_with_junk(h, 9)
    z, a = pool(hp, mask)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[0], z_ref, atol=1e-5, rtol=1e-5)
    if pool.has_attention:
        torch.testing.assert_close(a[0, :5], a_ref, atol=1e-5, rtol=1e-5)
        assert (a[0, 5:] == 0).all()
    else:
        assert a is None and a_ref is None


def test_junk_padding_keeps_gradients_finite(pool: nn.Module) -> None:
    hp, mask = pad_with_junk(torch.randn(4, DIM), 7)
    hp.requires_grad_(True)
    z, _ = pool(hp, mask)
    z.sum().backward()
    assert torch.isfinite(hp.grad).all() and (hp.grad[0, 4:] == 0).all()
    for p in pool.parameters():
        assert torch.isfinite(p.grad).all()


def test_permutation(pool: nn.Module) -> None:
    h = torch.randn(6, DIM)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    z, a = pool_alone(pool, h)
    z_p, a_p = pool_alone(pool, h[perm])
    torch.testing.assert_close(z_p, z, atol=1e-5, rtol=1e-5)
    if pool.has_attention:
        torch.testing.assert_close(a_p, a[perm], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["attention", "gated_attention"])
def test_attention_weights_sum_to_one_over_real_instances(name: str) -> None:
    pool = build_pooling(name, DIM, hidden=16)
    h, mask = padded_batch([torch.randn(n, DIM) for n in (1, 4, 7)])
    _, a = pool(h, mask)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.sum(dim=1), torch.ones(3))
    assert (a[~mask] == 0).all() and (a[mask] > 0).all()


def test_batch_matches_bags_pooled_alone(pool: nn.Module) -> None:
    bags = [torch.randn(n, DIM) for n in (2, 5, 3)]
    h, mask = padded_batch(bags)
    z, a = pool(h, mask)
    for i, bag in enumerate(bags):
        z_ref, a_ref = pool_alone(pool, bag)
        torch.testing.assert_close(z[i], z_ref, atol=1e-5, rtol=1e-5)
        if pool.has_attention:
            torch.testing.assert_close(a[i, : len(bag)], a_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_matches_float32(pool: nn.Module, input_dtype: torch.dtype) -> None:
    bags = [torch.randn(n, DIM) for n in (2, 5, 3)]
    h, mask = padded_batch(bags)
    z_ref, a_ref = pool(h, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, a = pool(h.to(input_dtype), mask)
    assert z.dtype == input_dtype and torch.isfinite(z).all()
    torch.testing.assert_close(z.float(), z_ref, atol=2e-2, rtol=2e-2)
    if pool.has_attention:
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, a_ref, atol=2e-2, rtol=2e-2)
        assert (a[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_huge_activations_finite_in_half(pool: nn.Module, dtype: torch.dtype) -> None:
    h, mask = padded_batch([torch.randn(n, DIM) * 1e4 for n in (2, 5, 3)])
    h = h.to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        z, a = pool(h, mask)
    assert torch.isfinite(z).all()
    if pool.has_attention:
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.sum(dim=1), torch.ones(3))


def test_pooled_values_are_the_documented_formulas() -> None:
    """Mean and max over the real crops; attention (Ilse et al. 2018) softmax(w^T tanh(V h)),
    gated: softmax(w^T (tanh(V h) * sigmoid(U h))), and the weighted sum."""
    h = torch.randn(1, 5, 8)
    mask = torch.tensor([[True, True, True, False, False]])
    real = h[0, :3]
    torch.testing.assert_close(build_pooling("mean", 8)(h, mask)[0][0], real.mean(0))
    torch.testing.assert_close(build_pooling("max", 8)(h, mask)[0][0], real.amax(0))
    for name in ("attention", "gated_attention"):
        pool = build_pooling(name, 8, hidden=4).eval()
        hidden = torch.tanh(pool.V(real))
        if name == "gated_attention":
            hidden = hidden * torch.sigmoid(pool.U(real))
        expected = torch.softmax(pool.w(hidden).squeeze(-1), 0)
        z, weights = pool(h, mask)
        torch.testing.assert_close(weights[0, :3], expected)
        torch.testing.assert_close(z[0], (expected[:, None] * real).sum(0))
