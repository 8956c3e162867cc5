"""The fusion benchmark's knobs (the experts' auxiliary loss, the clinical overlap) and script."""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from lympho_mil import GatedFusionMIL, SyntheticDataModule, collate_bags
from lympho_mil.data import SyntheticSettings
from lympho_mil.data.batch import BagBatch
from lympho_mil.data.dataset import Bag, BagDataset
from lympho_mil.data.synthetic import _patients, make_synthetic_dlmi
from lympho_mil.data.transforms import BagToTensor
from lympho_mil.nn import EncoderSettings, FusionSettings

TINY_ENCODER = {"encoder": EncoderSettings("small_cnn", out_dim=16, kwargs={"width": 8})}
STATS = {"mean": [0.0, 0.0, 0.0], "scale": [1.0, 1.0, 1.0]}


def tiny_batch(n_bags: int = 6, size: int = 16) -> BagBatch:
    rng = np.random.default_rng(0)
    store = rng.integers(0, 255, size=(4 * n_bags, size, size, 3), dtype=np.uint8)
    bags = [
        Bag(f"B{b}", b % 2, np.arange(4 * b, 4 * b + 4), ("a", "b", "c", "d"), rng.random(3))
        for b in range(n_bags)
    ]
    dataset = BagDataset(bags, store, BagToTensor())
    return collate_bags([dataset[i] for i in range(n_bags)])


def fusion(weight: float, gate_bias: float | None = None) -> GatedFusionMIL:
    torch.manual_seed(0)
    model = GatedFusionMIL(
        **TINY_ENCODER,
        expert_loss_weight=weight,
        pos_weight=0.5,
        tabular_dim=3,
        tabular_stats=STATS,
    )
    if gate_bias is not None:
        with torch.no_grad():
            model.net.fusion.gate[-1].bias.fill_(gate_bias)
    return model


def test_expert_loss_adds_each_experts_own_bce() -> None:
    batch = tiny_batch()
    plain, aux = fusion(0.0), fusion(0.7)
    out = aux(batch)
    assert out.extras is not None
    pos_weight = torch.tensor(0.5)
    experts = sum(
        F.binary_cross_entropy_with_logits(
            out.extras[k], batch.label.float(), pos_weight=pos_weight
        )
        for k in ("image_logit", "tabular_logit")
    )
    torch.testing.assert_close(aux.loss(out, batch), plain.loss(out, batch) + 0.7 * experts)


def test_expert_loss_feeds_the_expert_a_saturated_gate_starves() -> None:
    """Gate pinned to the clinical expert: without the auxiliary loss the image expert gets no
    gradient at all; with it, exactly that of its own BCE times the weight."""
    batch = tiny_batch()
    grads = {}
    for weight in (0.0, 2.0):
        model = fusion(weight, gate_bias=-200.0)  # g = 0: p = sigmoid(s_tab)
        out = model(batch)
        model.loss(out, batch).backward()
        grads[weight] = model.net.fusion.image_head.weight.grad.clone()
    assert grads[0.0].abs().sum() == 0
    model = fusion(0.0, gate_bias=-200.0)
    out = model(batch)
    assert out.extras is not None
    own = F.binary_cross_entropy_with_logits(
        out.extras["image_logit"], batch.label.float(), pos_weight=torch.tensor(0.5)
    )
    own.backward()
    expected = 2.0 * model.net.fusion.image_head.weight.grad
    torch.testing.assert_close(grads[2.0], expected)
    assert expected.abs().sum() > 0


def test_expert_loss_weight_is_checked_and_saved() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        fusion(-1.0)
    with pytest.raises(ValueError, match="gated"):
        concat = FusionSettings(kind="concat")
        GatedFusionMIL(**TINY_ENCODER, fusion=concat, expert_loss_weight=1.0, tabular_dim=3)
    assert fusion(0.5).hparams["expert_loss_weight"] == 0.5
    assert GatedFusionMIL(**TINY_ENCODER, tabular_dim=3).expert_loss_weight == 0.0


def test_confidence_gate_is_saved_and_built() -> None:
    confidence = FusionSettings(gate_input="confidence")
    model = GatedFusionMIL(**TINY_ENCODER, fusion=confidence, tabular_dim=3)
    assert model.hparams["fusion"]["gate_input"] == "confidence"
    assert [p.shape for p in model.net.fusion.gate.parameters()] == [(1, 2), (1,)]
    out = model(tiny_batch())
    assert out.extras is not None and out.extras["gate"].shape == (6,)


def lymph_count_auroc(overlap: float) -> float:
    patients = _patients(np.random.default_rng(5), 2000, 0.0, 1, 2, 0.65, date(2020, 1, 1), overlap)
    labels = [p.label for p in patients]
    return roc_auc_score(labels, [float(p.lymph_count) for p in patients])


def test_clinical_overlap_weakens_only_the_clinical_signal() -> None:
    aurocs = [lymph_count_auroc(q) for q in (0.0, 0.3, 1.0)]
    assert aurocs[0] > 0.8
    assert aurocs[1] < aurocs[0] - 0.05
    assert abs(aurocs[2] - 0.5) < 0.05  # no clinical information left
    patients = _patients(np.random.default_rng(5), 2000, 0.0, 1, 2, 0.65, date(2020, 1, 1), 1.0)
    fractions = np.array([(p.label, p.abnormal_fraction) for p in patients])
    assert fractions[fractions[:, 0] == 1, 1].min() >= 0.2  # the crops keep their own class
    assert fractions[fractions[:, 0] == 0, 1].max() <= 0.05


def digest(root: Path) -> list[str]:
    names = ("clinical_annotation.csv", "ground_truth.csv")
    return [hashlib.sha256((root / n).read_bytes()).hexdigest()[:16] for n in names]


def test_default_generator_output_is_unchanged(tmp_path: Path) -> None:
    """Byte-identical to the generator before ``clinical_overlap`` existed (hashes recorded
    from that version): the quickstart and the cached datasets depend on it."""
    kwargs = {"seed": 3, "min_cells": 1, "max_cells": 3}
    root = make_synthetic_dlmi(tmp_path / "a", 24, 16, **kwargs)
    assert digest(root) == ["42830413918fcfde", "d0bbb8ccb25d6454"]
    other = make_synthetic_dlmi(tmp_path / "b", 24, 16, clinical_overlap=0.5, **kwargs)
    assert digest(other)[0] != digest(root)[0]


def test_clinical_overlap_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clinical_overlap"):
        make_synthetic_dlmi(tmp_path, 4, 16, clinical_overlap=1.5)


def test_datamodule_names_its_cache_by_overlap_only_when_set() -> None:
    plain = SyntheticDataModule(
        synthetic=SyntheticSettings(n_patients=6, image_size=16, max_cells=16)
    )
    mixed = SyntheticDataModule(
        synthetic=SyntheticSettings(n_patients=6, image_size=16, max_cells=16, clinical_overlap=0.3)
    )
    assert plain.source.root.name == "n6-px16-cells16-seed0"
    assert mixed.source.root.name == "n6-px16-cells16-seed0-overlap0.3"
    assert (mixed.source.root / "clinical_annotation.csv").read_bytes() != (
        plain.source.root / "clinical_annotation.csv"
    ).read_bytes()
