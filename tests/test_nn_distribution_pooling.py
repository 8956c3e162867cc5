"""Distribution pooling: the mean and the share of instances above fixed levels, per feature."""

from __future__ import annotations

import pytest
import torch

from lympho_mil.data.batch import BagBatch
from lympho_mil.models import GatedFusionMIL
from lympho_mil.nn import (
    DistributionPooling,
    EncoderSettings,
    FusionSettings,
    PoolingSettings,
    build_pooling,
)


def test_mean_then_shares_above_each_level_per_feature() -> None:
    values = torch.tensor([[-2.0, 10.0], [0.0, 10.0], [0.5, 10.0], [3.0, -10.0]])
    h = torch.cat([values, torch.full((2, 2), float("nan"))]).unsqueeze(0)  # 2 padded rows
    mask = torch.tensor([[True] * 4 + [False] * 2])
    pool = DistributionPooling(levels=(-1.0, 1.0), temperature=1e-3)
    z, weights = pool(h, mask)
    assert weights is None and z.shape == (1, pool.output_dim(2)) == (1, 6)
    expected = [0.375, 5.0, 0.75, 0.75, 0.25, 0.75]  # [mean | share > -1 | share > 1]
    torch.testing.assert_close(z[0], torch.tensor(expected))


def test_soft_shares_pass_gradients_to_the_instances() -> None:
    h = torch.zeros(1, 3, 2, requires_grad=True)
    z, _ = DistributionPooling(levels=(0.0,), temperature=0.5)(h, torch.ones(1, 3, dtype=bool))
    z[0, 2:].sum().backward()  # the shares only
    torch.testing.assert_close(h.grad, torch.full_like(h, 0.25 / 0.5 / 3))


def test_factory_and_invalid_settings() -> None:
    pool = build_pooling("distribution", 5)
    assert isinstance(pool, DistributionPooling) and pool.output_dim(5) == 15
    for bad in ({"levels": ()}, {"temperature": 0.0}):
        with pytest.raises(ValueError, match="temperature"):
            DistributionPooling(**bad)


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_fusion_model_sizes_its_head_to_the_pooled_embedding(fusion: str) -> None:
    model = GatedFusionMIL(
        encoder=EncoderSettings("identity", in_dim=4),
        pooling=PoolingSettings("distribution"),
        fusion=FusionSettings(kind=fusion),  # type: ignore[arg-type]
        tabular_dim=3,
    )
    assert model.net.bag_dim == 12
    batch = BagBatch(
        instances=torch.randn(2, 5, 4),
        mask=torch.ones(2, 5, dtype=torch.bool),
        tabular=torch.randn(2, 3),
        label=torch.tensor([0, 1]),
        bag_id=["a", "b"],
        instance_id=[[str(i) for i in range(5)]] * 2,
    )
    out = model(batch)
    assert out.logit.shape == (2,) and torch.isfinite(out.logit).all()
    torch.testing.assert_close(out.weights, torch.full((2, 5), 0.2))
