"""Test-time augmentation: exact dihedral views, orientation-free predictions, clear refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_models import STATS, TINY_ENCODER, features_of, loader, separable_bags
from trainers import quiet_trainer

from lympho_mil import (
    AttentionMIL,
    BagClassifier,
    GatedFusionMIL,
    InstanceMIL,
    MaxPoolMIL,
    TabularMLP,
)
from lympho_mil.data import BagBatch
from lympho_mil.dihedral import dihedral, stack_dihedral_views
from lympho_mil.nn import dihedral_views

TTA_MODELS = [
    lambda **kw: AttentionMIL(**TINY_ENCODER, **kw),
    lambda **kw: MaxPoolMIL(**TINY_ENCODER, **kw),
    lambda **kw: InstanceMIL(**TINY_ENCODER, **kw),
    lambda **kw: GatedFusionMIL(**TINY_ENCODER, tabular_dim=3, tabular_stats=STATS, **kw),
]


def one_batch() -> BagBatch:
    bags, store = separable_bags(n_bags=4, seed=3)
    return next(iter(loader(bags, store, shuffle=False)))


def test_dihedral_views_are_the_eight_distinct_symmetries() -> None:
    crops = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(1, 2, 3, 4, 4)
    views = list(dihedral_views(crops, 8))
    assert torch.equal(views[0], crops)
    assert torch.equal(dihedral(crops, 1), torch.rot90(crops, 1, dims=(-2, -1)))
    assert torch.equal(dihedral(crops, 4), crops.flip(-1))
    with pytest.raises(ValueError, match=r"0\.\.7"):
        dihedral(crops, 8)
    flat = {tuple(v.flatten().tolist()) for v in views}
    assert len(flat) == 8  # no symmetry repeated
    for view in views:  # each is a rearrangement of each crop's own pixels, crop order kept
        assert view.shape == crops.shape
        for i in range(2):
            assert sorted(view[0, i].flatten().tolist()) == sorted(crops[0, i].flatten().tolist())
    # a group: the views of a rotated or mirrored crop are the same eight
    for moved in (torch.rot90(crops, 1, dims=(-2, -1)), crops.flip(-2)):
        assert {tuple(v.flatten().tolist()) for v in dihedral_views(moved, 8)} == flat
    four = list(dihedral_views(crops, 4))
    assert len(four) == 4 and all(torch.equal(a, b) for a, b in zip(four, views, strict=False))
    assert torch.equal(list(dihedral_views(crops, 2))[1], crops.flip(-1))
    assert len(list(dihedral_views(crops, 1))) == 1
    stacked = stack_dihedral_views(crops[0])  # the feature cache's [M, 8, C, H, W]
    assert all(torch.equal(stacked[:, v], views[v][0]) for v in range(8))


def test_dihedral_views_keep_the_contiguous_layout() -> None:
    """An odd rotation alone swaps the H and W strides, which the flattened crops keep: a
    compiled encoder would recompile for that second layout."""
    crops = torch.randn(2, 3, 3, 8, 8)
    assert all(view.is_contiguous() for view in dihedral_views(crops, 8))


def test_dihedral_views_refuse_what_they_cannot_view() -> None:
    with pytest.raises(ValueError, match="one of"):
        dihedral_views(torch.zeros(1, 2, 3, 4, 4), 3)
    with pytest.raises(ValueError, match="feature bags"):
        dihedral_views(torch.zeros(1, 2, 33), 8)
    with pytest.raises(ValueError, match="square"):
        dihedral_views(torch.zeros(1, 2, 3, 4, 6), 4)
    assert (
        len(list(dihedral_views(torch.zeros(1, 2, 3, 4, 6), 2))) == 2
    )  # mirror images need no square


@pytest.mark.parametrize("make", TTA_MODELS)
def test_eight_views_make_predictions_blind_to_orientation(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = make(tta_views=8).eval()
    batch = one_batch()
    turned = dataclasses.replace(batch, instances=torch.rot90(batch.instances, 1, dims=(-2, -1)))
    mirrored = dataclasses.replace(batch, instances=batch.instances.flip(-2))
    with torch.no_grad():
        out = model.infer(batch)
        plain = model(batch)
        for moved in (turned, mirrored):
            other = model.infer(moved)
            torch.testing.assert_close(other.logit, out.logit, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(other.weights, out.weights, atol=1e-5, rtol=1e-5)
        # without test-time views, the same model does see the orientation
        assert not torch.allclose(model(turned).logit, plain.logit, atol=1e-4)


def test_the_averages_are_over_the_views_and_weights_still_sum_to_one() -> None:
    torch.manual_seed(0)
    model = GatedFusionMIL(**TINY_ENCODER, tabular_dim=3, tabular_stats=STATS, tta_views=4).eval()
    batch = one_batch()
    with torch.no_grad():
        outs = [
            model(dataclasses.replace(batch, instances=torch.rot90(batch.instances, k, (-2, -1))))
            for k in range(4)
        ]
        got = model.infer(batch)
    torch.testing.assert_close(got.logit, torch.stack([o.logit for o in outs]).mean(0))
    for name in ("gate", "image_logit", "tabular_logit"):
        expected = torch.stack([o.extras[name] for o in outs]).mean(0)
        torch.testing.assert_close(got.extras[name], expected)
    torch.testing.assert_close(got.weights.sum(1), torch.ones(len(batch.bag_id)))
    assert torch.all(got.weights[~batch.mask] == 0)


def test_training_steps_never_use_the_views() -> None:
    torch.manual_seed(0)
    model = AttentionMIL(**TINY_ENCODER, tta_views=8).train()
    calls = []
    model.net.register_forward_pre_hook(lambda module, args: calls.append(1))
    model.infer(one_batch())
    assert len(calls) == 1
    model.eval()
    model.infer(one_batch())
    assert len(calls) == 1 + 8


def test_validation_and_test_steps_use_the_views() -> None:
    torch.manual_seed(0)
    model = AttentionMIL(**TINY_ENCODER, tta_views=4)
    calls = []
    model.net.register_forward_pre_hook(lambda module, args: calls.append(1))
    batches = loader(*separable_bags(n_bags=8), shuffle=False)  # 2 batches of 4 bags
    quiet_trainer().validate(model, batches, verbose=False)
    assert len(calls) == 2 * 4
    quiet_trainer().test(model, batches, verbose=False)
    assert len(calls) == 2 * 2 * 4


def test_predict_and_a_reloaded_checkpoint_use_the_views(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bags, store = separable_bags(n_bags=8)
    torch.manual_seed(0)
    model = AttentionMIL(**TINY_ENCODER)
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, loader(bags, store, shuffle=True))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    def probabilities(m: BagClassifier) -> list[float]:
        batches = quiet_trainer().predict(m, loader(bags, store, shuffle=False))
        return [r["probability"] for batch in batches for r in batch]

    plain = AttentionMIL.load_from_checkpoint(path)
    viewed = AttentionMIL.load_from_checkpoint(path, tta_views=8)
    assert viewed.tta_views == 8 and plain.tta_views == 1
    expected = []
    viewed.eval()
    with torch.no_grad():
        for batch in loader(bags, store, shuffle=False):
            logits = [
                viewed(dataclasses.replace(batch, instances=v)).logit
                for v in dihedral_views(batch.instances, 8)
            ]
            expected += torch.sigmoid(torch.stack(logits).mean(0)).tolist()
    assert probabilities(viewed) == pytest.approx(expected, abs=1e-6)
    assert probabilities(plain) != pytest.approx(expected, abs=1e-4)


def test_models_without_crops_refuse_views() -> None:
    with pytest.raises(ValueError, match="reads no crops"):
        TabularMLP(tabular_dim=3, tta_views=8)
    with pytest.raises(ValueError, match="one of"):
        AttentionMIL(**TINY_ENCODER, tta_views=6)
    with pytest.raises(ValueError, match="feature vectors"):
        AttentionMIL(encoder=features_of(5, "mlp"), tta_views=2)
    model = AttentionMIL(encoder=features_of(5)).eval()
    model.tta_views = 8  # features reaching a model with views (e.g. a pixel model's batch)
    features = BagBatch(
        instances=torch.zeros(1, 3, 5),
        mask=torch.ones(1, 3, dtype=torch.bool),
        tabular=torch.zeros(1, 0),
        label=torch.zeros(1),
        bag_id=["P1"],
        instance_id=[["a", "b", "c"]],
    )
    with pytest.raises(ValueError, match="feature bags"):
        model.infer(features)
