"""Every model fits a separable set; padding never matters; the fusion gate may saturate."""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from trainers import quiet_trainer

from lympho_mil import (
    AttentionMIL,
    BagClassifier,
    GatedAttentionMIL,
    GatedFusionMIL,
    InstanceMIL,
    LogitSumMIL,
    MaxPoolMIL,
    MeanPoolMIL,
    TabularMLP,
    collate_bags,
)
from lympho_mil.data import BagSample
from lympho_mil.data.dataset import Bag, BagDataset
from lympho_mil.data.errors import DataError
from lympho_mil.data.transforms import BagToTensor
from lympho_mil.evaluation import binary_metrics
from lympho_mil.models import OptimSettings
from lympho_mil.models.metrics import BinaryBalancedAccuracy
from lympho_mil.nn import EncoderSettings, FusionSettings, PoolingSettings

SIZE = 16
IMAGE_MODELS = [AttentionMIL, GatedAttentionMIL, MeanPoolMIL, MaxPoolMIL, InstanceMIL]
FAST = OptimSettings(lr=3e-3)
TINY_ENCODER = {"encoder": EncoderSettings("small_cnn", out_dim=16, kwargs={"width": 8})}


def features_of(in_dim: int, name: str = "identity") -> EncoderSettings:
    """The encoder of feature bags of ``in_dim`` values per crop."""
    return EncoderSettings(name, in_dim=in_dim)


def separable_bags(n_bags: int = 24, seed: int = 0) -> tuple[list[Bag], np.ndarray]:
    """Positive bags hold mostly crops with a bright centre square; negatives none.

    The clinical vector separates the classes too (for the clinical-only model).
    """
    rng = np.random.default_rng(seed)
    crops, bags, start = [], [], 0
    for b in range(n_bags):
        label = b % 2
        n = int(rng.integers(4, 9))
        bag = rng.integers(0, 80, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
        if label:
            bright = rng.random(n) < 0.7
            bright[0] = True
            bag[bright, 4:12, 4:12] = 230
        crops.append(bag)
        tabular = np.array([label + 0.3 * rng.standard_normal(), rng.standard_normal(), 0.0])
        rows = np.arange(start, start + n)
        ids = tuple(f"{i}.png" for i in range(n))
        bags.append(Bag(f"B{b}", label, rows, ids, tabular.astype(np.float32)))
        start += n
    return bags, np.concatenate(crops)


def loader(bags: list[Bag], store: np.ndarray, shuffle: bool) -> DataLoader:
    dataset = BagDataset(bags, store, BagToTensor(None, (0.2, 0.2, 0.2), (0.3, 0.3, 0.3)))
    return DataLoader(dataset, batch_size=4, shuffle=shuffle, collate_fn=collate_bags)


def fit_and_score(model: BagClassifier, epochs: int) -> float:
    bags, store = separable_bags()
    trainer = quiet_trainer(
        max_epochs=epochs,
    )
    trainer.fit(model, loader(bags, store, shuffle=True))
    records = [r for batch in trainer.predict(model, loader(bags, store, False)) for r in batch]
    predicted = torch.tensor([int(r["probability"] >= 0.5) for r in records])
    target = torch.tensor([r["label"] for r in records])
    return float(BinaryBalancedAccuracy()(predicted, target))


STATS = {"mean": [0.5, 0.0, 0.0], "scale": [0.6, 1.0, 1.0]}


@pytest.mark.slow
@pytest.mark.parametrize("model_cls", IMAGE_MODELS, ids=lambda c: c.__name__)
def test_image_models_fit_a_separable_set(model_cls: type[BagClassifier]) -> None:
    L.seed_everything(0)
    model = model_cls(**TINY_ENCODER, optim=FAST, tabular_dim=3, tabular_stats=STATS)
    assert fit_and_score(model, epochs=25) >= 0.9


def test_tabular_mlp_fits_a_separable_set() -> None:
    L.seed_everything(0)
    model = TabularMLP(optim=OptimSettings(lr=1e-2), tabular_dim=3, tabular_stats=STATS)
    assert fit_and_score(model, 30) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["gated", "concat"])
def test_fusion_fits_a_separable_set(fusion: str) -> None:
    L.seed_everything(0)
    model = GatedFusionMIL(
        **TINY_ENCODER,
        fusion=FusionSettings(kind=fusion),
        optim=FAST,
        tabular_dim=3,
        tabular_stats=STATS,
    )
    assert fit_and_score(model, epochs=25) >= 0.9


@pytest.mark.parametrize(
    "model_cls", [*IMAGE_MODELS, GatedFusionMIL, TabularMLP], ids=lambda c: c.__name__
)
def test_padding_and_batch_mates_never_change_a_patient(model_cls: type) -> None:
    torch.manual_seed(0)
    kwargs = {} if model_cls is TabularMLP else TINY_ENCODER
    model = model_cls(**kwargs, tabular_dim=3, tabular_stats=STATS).eval()
    bags, store = separable_bags(4)
    dataset = BagDataset(bags, store, BagToTensor())
    alone = [model(collate_bags([dataset[i]])) for i in range(4)]
    together = model(collate_bags([dataset[i] for i in range(4)]))
    for i, out in enumerate(alone):
        n = len(bags[i].rows)
        torch.testing.assert_close(together.logit[i], out.logit[0], atol=1e-5, rtol=1e-4)
        if out.weights is not None:
            torch.testing.assert_close(
                together.weights[i, :n], out.weights[0], atol=1e-5, rtol=1e-4
            )
            assert together.weights[i, n:].abs().sum() == 0
            assert together.weights[i].sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("gate_bias", [200.0, -200.0])
def test_gated_fusion_survives_a_saturated_gate(gate_bias: float) -> None:
    torch.manual_seed(0)
    model = GatedFusionMIL(**TINY_ENCODER, tabular_dim=3, tabular_stats=STATS)
    with torch.no_grad():
        model.net.fusion.gate[-1].bias.fill_(gate_bias)
    bags, store = separable_bags(8)
    batch = next(iter(loader(bags, store, shuffle=False)))
    out = model(batch)
    assert out.extras is not None
    expected_gate = 1.0 if gate_bias > 0 else 0.0
    assert torch.all(out.extras["gate"] == expected_gate)  # exactly saturated
    loss = model.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss)
    chosen = model.net.fusion.image_head if gate_bias > 0 else model.net.fusion.tabular_head
    assert torch.isfinite(chosen.weight.grad).all() and chosen.weight.grad.abs().sum() > 0
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("model_cls", [AttentionMIL, GatedFusionMIL], ids=lambda c: c.__name__)
def test_bf16_mixed_precision_trains_on_cpu(model_cls: type[BagClassifier]) -> None:
    L.seed_everything(0)
    bags, store = separable_bags(8)
    model = model_cls(**TINY_ENCODER, tabular_dim=3, tabular_stats=STATS)
    dtypes: set[torch.dtype] = set()
    model.net.encoder.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(
        max_epochs=1,
        precision="bf16-mixed",
    )
    trainer.fit(model, loader(bags, store, shuffle=True))
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert torch.bfloat16 in dtypes  # the encoder ran under bf16 autocast
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_non_finite_loss_names_step_and_patients() -> None:
    from lympho_mil.models import NonFiniteLossError

    bags, store = separable_bags(4)
    model = AttentionMIL(**TINY_ENCODER, tabular_dim=3, tabular_stats=STATS)
    with torch.no_grad():
        model.net.head[-1].bias.fill_(float("nan"))
    trainer = quiet_trainer(
        max_epochs=1,
    )
    with pytest.raises(NonFiniteLossError, match=r"global step 0.*patients \['B"):
        trainer.fit(model, loader(bags, store, shuffle=False))


def test_any_seed_everything_seed_trains() -> None:
    """The per-step reseeding stays in torch's range for the largest seed Lightning takes."""
    L.seed_everything(2**32 - 1, verbose=False)
    bags, store = separable_bags(4)
    model = TabularMLP(tabular_dim=3, tabular_stats=STATS)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, loader(bags, store, shuffle=True))
    assert trainer.global_step > 0


def test_a_threshold_asked_at_load_replaces_the_checkpoints(tmp_path: Path) -> None:
    bags, store = separable_bags(4)
    model = TabularMLP(tabular_dim=3, tabular_stats=STATS)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, loader(bags, store, shuffle=False))
    model.threshold.fill_(0.4)  # as cv does with the threshold chosen on validation patients
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert float(TabularMLP.load_from_checkpoint(path).threshold) == pytest.approx(0.4)
    assert float(TabularMLP.load_from_checkpoint(path, threshold=0.2).threshold) == pytest.approx(
        0.2
    )

    def predicted_threshold(threshold: float, asked: bool = False, ckpt: Path = path) -> float:
        fresh = TabularMLP(tabular_dim=3, tabular_stats=STATS, threshold=threshold)
        fresh.threshold_asked = asked  # as the CLI sets it for --model.threshold
        batches = quiet_trainer().predict(fresh, loader(bags, store, False), ckpt_path=ckpt)
        return batches[0][0]["threshold"]

    assert predicted_threshold(0.5) == pytest.approx(0.4)  # the config's own setting: kept
    assert predicted_threshold(0.3) == pytest.approx(0.3)
    assert predicted_threshold(0.5, asked=True) == pytest.approx(0.5)
    # a checkpoint written before the setting was recorded: an asked threshold still wins
    content = torch.load(path, map_location="cpu", weights_only=True)
    del content["lympho_mil"]["threshold_setting"]
    older = tmp_path / "older.ckpt"
    torch.save(content, older)
    assert predicted_threshold(0.5, ckpt=older) == pytest.approx(0.4)
    assert predicted_threshold(0.5, asked=True, ckpt=older) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("predicted", "target"),
    [([1, 0, 1, 1], [1, 0, 0, 1]), ([1, 1, 0], [1, 1, 1]), ([0, 1, 0], [0, 0, 0]), ([1], [1])],
)
def test_balanced_accuracy_is_scikit_learns(predicted: list[int], target: list[int]) -> None:
    """Also with one class only (an epoch's validation patients may all be tumoral)."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns about the absent class
        expected = balanced_accuracy_score(target, predicted)
    metric = BinaryBalancedAccuracy()(torch.tensor(predicted), torch.tensor(target))
    assert float(metric) == pytest.approx(expected)


@pytest.mark.parametrize("scheduler", ["cosine", "none"])
def test_learning_rate_per_epoch(scheduler: str) -> None:
    """Cosine: annealed over max_epochs, one step per epoch; none: constant."""
    lrs: list[float] = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:  # type: ignore[no-untyped-def]
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    bags, store = separable_bags(8)
    optim = OptimSettings(lr=1e-2, scheduler=scheduler)  # type: ignore[arg-type]
    model = TabularMLP(optim=optim, tabular_dim=3, tabular_stats=STATS)
    quiet_trainer(max_epochs=4, callbacks=[Record()]).fit(model, loader(bags, store, True))
    if scheduler == "none":
        assert lrs == [1e-2] * 4
    else:
        expected = [1e-2 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
        assert lrs == pytest.approx(expected)


def test_a_resumed_run_given_more_epochs_stretches_the_cosine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """2 epochs, then resumed to 4: epochs 2 and 3 follow the 4-epoch cosine, not 0."""
    lrs: dict[int, float] = {}

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:  # type: ignore[no-untyped-def]
            lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    bags, store = separable_bags(8)
    model = TabularMLP(optim=OptimSettings(lr=1e-2), tabular_dim=3, tabular_stats=STATS)
    first = quiet_trainer(max_epochs=2, callbacks=[Record()], default_root_dir=tmp_path)
    first.fit(model, loader(bags, store, True))
    first.save_checkpoint(tmp_path / "two.ckpt")
    weights = [p.detach().clone() for p in model.parameters()]
    longer = quiet_trainer(max_epochs=4, callbacks=[Record()], default_root_dir=tmp_path)
    longer.fit(model, loader(bags, store, True), ckpt_path=tmp_path / "two.ckpt")
    expected = [1e-2 * (1 + math.cos(math.pi * e / 4)) / 2 for e in (2, 3)]
    assert [lrs[2], lrs[3]] == pytest.approx(expected)
    assert lrs[0] == pytest.approx(1e-2) and lrs[1] == pytest.approx(0.5e-2)  # the 2-epoch plan
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_a_run_resumed_with_a_step_budget_goes_on_from_its_steps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """2 epochs, then resumed with max_steps (4 epochs' worth) instead of an epoch count: the
    cosine goes on from the steps done (its half), not from 2 steps of the new budget."""
    lrs: dict[int, float] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    from lightning.pytorch.callbacks import ModelCheckpoint

    bags, store = separable_bags(8)
    model = TabularMLP(optim=OptimSettings(lr=1e-2), tabular_dim=3, tabular_stats=STATS)
    every_epoch = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # as a killed run leaves
    first = quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[every_epoch])
    first.fit(model, loader(bags, store, True), loader(bags, store, False))  # saved at val end
    done = first.global_step
    assert done >= 2
    # with max_steps set, Lightning replays the end of that epoch first, without any batch
    resumed = quiet_trainer(max_steps=2 * done, callbacks=[Record()], default_root_dir=tmp_path)
    resumed.fit(
        model,
        loader(bags, store, True),
        loader(bags, store, False),
        ckpt_path=tmp_path / "last.ckpt",
    )
    expected = [1e-2 * (1 + math.cos(math.pi * s / (2 * done))) / 2 for s in range(done, 2 * done)]
    assert [lrs[s] for s in range(done, 2 * done)] == pytest.approx(expected)


def test_a_scheduler_given_instead_of_the_models_keeps_its_length() -> None:
    """LightningCLI's --lr_scheduler replaces configure_optimizers: its cosine is not the
    model's, and on_train_start must not stretch it to max_epochs."""
    lrs: list[float] = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:  # type: ignore[no-untyped-def]
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def given(self: BagClassifier) -> object:  # what LightningCLI puts in its place
        optimizer = torch.optim.SGD(self.parameters(), lr=1e-2)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)
        return {"optimizer": optimizer, "lr_scheduler": cosine}

    bags, store = separable_bags(8)
    model = TabularMLP(tabular_dim=3, tabular_stats=STATS)
    model.configure_optimizers = types.MethodType(given, model)  # type: ignore[method-assign]
    quiet_trainer(max_epochs=3, callbacks=[Record()]).fit(model, loader(bags, store, True))
    assert lrs == pytest.approx([1e-2, 0.5e-2, 0.0])  # T_max 2, not stretched to 3 epochs


def test_a_cosine_without_a_length_is_refused_by_name() -> None:
    bags, store = separable_bags(8)
    model = TabularMLP(tabular_dim=3, tabular_stats=STATS)
    with pytest.raises(ValueError, match="neither is set"):  # not an OverflowError
        quiet_trainer(max_epochs=-1).fit(model, loader(bags, store, True))


def test_cosine_schedule_over_a_step_budget() -> None:
    """With max_steps and no epoch count the learning rate anneals once, step by step."""
    lrs: list[float] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    bags, store = separable_bags(8)
    model = TabularMLP(optim=OptimSettings(lr=1e-2), tabular_dim=3, tabular_stats=STATS)
    quiet_trainer(max_steps=12, callbacks=[Record()]).fit(model, loader(bags, store, True))
    assert len(lrs) == 12 and lrs[0] == pytest.approx(1e-2)
    assert all(b < a for a, b in itertools.pairwise(lrs)) and lrs[-1] > 0


@pytest.mark.parametrize(
    ("model_cls", "setting", "value"),
    [
        (AttentionMIL, "optim.lr", 0.0),
        (AttentionMIL, "optim.weight_decay", -0.1),
        (AttentionMIL, "encoder.out_dim", 0),
        (AttentionMIL, "attention_hidden", 0),
        (AttentionMIL, "chunk_size", 0),
        (AttentionMIL, "encoder.shape_multiple", 0),
        (AttentionMIL, "dropout", 1.0),
        (InstanceMIL, "encoder.out_dim", -1),
        (TabularMLP, "hidden", 0),
        (TabularMLP, "dropout", -0.1),
        (GatedFusionMIL, "fusion.tabular_embed_dim", 0),
        (GatedFusionMIL, "fusion.gate_input", "nope"),  # also with concat, which has no gate
        (GatedFusionMIL, "pooling.hidden", 0),
        (LogitSumMIL, "clinical_hidden", 0),
        (LogitSumMIL, "in_dim", 0),
        (LogitSumMIL, "image_experts", ["mean", "attention"]),
        (LogitSumMIL, "image_experts", ["mean", "mean"]),
        (LogitSumMIL, "image_experts", []),
        (LogitSumMIL, "cell_types", 5),  # without the 'types' expert
    ],
)
def test_sizes_and_rates_that_cannot_work_are_named_at_construction(
    model_cls: type, setting: str, value: object
) -> None:
    """Grouped settings are checked as given in a config: plain mappings."""
    group, _, name = setting.rpartition(".")
    kwargs: dict[str, Any] = {"tabular_dim": 3}
    if model_cls is LogitSumMIL:
        kwargs.update(in_dim=8, image_experts=["mean"], cell_types=0)
    if model_cls is GatedFusionMIL:
        kwargs["fusion"] = {"kind": "concat"}
    if group:
        kwargs[group] = {**kwargs.get(group, {}), name: value}
    else:
        kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        model_cls(**kwargs)


def test_settings_that_cannot_work_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="scheduler"):
        TabularMLP(tabular_dim=3, optim={"scheduler": "linear"})
    with pytest.raises(ValueError, match="tabular_dim is 3"):
        TabularMLP(tabular_dim=3, tabular_stats={"mean": [0.0] * 4, "scale": [1.0] * 4})


def test_max_pool_crop_weights_share_ties() -> None:
    """Crop 1 holds dimension 0's maximum, crop 2 dimension 1's; dimensions 2-3 are 0 on every
    real crop (a dead ReLU): their credit is shared, never all given to crop 0."""
    from lympho_mil.nn import MaxPooling
    from lympho_mil.nn.nets import fallback_weights

    h = torch.tensor([[[0.1, 0.2, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0], [0.3, 0.8, 0.0, 0.0]]])
    h = torch.cat([h, torch.full((1, 1, 4), 5.0)], dim=1)  # a padding row: never credited
    mask = torch.tensor([[True, True, True, False]])
    weights = fallback_weights(h, mask, MaxPooling())
    third = 2 / 3 / 4  # two dead dimensions, each shared by the 3 real crops
    assert weights[0].tolist() == pytest.approx([third, 0.25 + third, 0.25 + third, 0.0])
    assert weights.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("encoder_kwargs", [None, {"pretrained": True}])
def test_a_checkpoint_reloads_without_the_encoders_initial_weights_file(
    tmp_path, encoder_kwargs: dict[str, Any] | None
) -> None:  # type: ignore[no-untyped-def]
    """The checkpoint holds the weights: predicting elsewhere needs no initial file, nor a
    download of the pretrained weights the file stood for."""
    import timm

    weights = tmp_path / "backbone.pt"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    encoder = EncoderSettings("test_resnet", weights=str(weights), kwargs=encoder_kwargs)
    model = AttentionMIL(encoder=encoder, attention_hidden=8)
    bags, store = separable_bags(4)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1)
    trainer.fit(model, loader(bags, store, shuffle=False))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    weights.unlink()
    reloaded = AttentionMIL.load_from_checkpoint(path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)
    saved = torch.load(path, weights_only=True)["lympho_mil"]
    assert saved["initial_encoder_weights"] == str(weights)  # provenance kept
    assert model.hparams.encoder["weights"] == str(weights)  # the live model's settings untouched
    assert model.hparams.encoder["kwargs"] == encoder_kwargs


def test_instance_mil_averages_crop_logits_and_learns_each_crop() -> None:
    """InstanceMIL: the patient logit is the mean crop logit; the loss is each crop's BCE
    against its patient's label, averaged per patient (not the patient-level BCE)."""
    model = InstanceMIL(encoder=EncoderSettings("identity", in_dim=4), pos_weight=2.0)
    sizes = (2, 5)
    samples = [
        BagSample(torch.randn(n, 4), torch.zeros(0), float(n % 2), f"b{n}", ["x"] * n)
        for n in sizes
    ]
    batch = collate_bags(samples)
    out = model(batch)
    weight = torch.tensor(2.0)
    per_patient = []
    for b, n in enumerate(sizes):
        crop_logits = model.net.head(batch.instances[b, :n]).squeeze(-1)
        torch.testing.assert_close(out.logit[b], crop_logits.mean())
        target = batch.label[b].expand(n)
        bce = F.binary_cross_entropy_with_logits(crop_logits, target, pos_weight=weight)
        per_patient.append(bce)
    torch.testing.assert_close(model.loss(out, batch), torch.stack(per_patient).mean())


def test_logged_metrics_apply_the_models_threshold() -> None:
    bags, store = separable_bags(16)
    model = TabularMLP(tabular_dim=3, tabular_stats=STATS, threshold=0.3)
    trainer = quiet_trainer()
    (logged,) = trainer.validate(model, loader(bags, store, False), verbose=False)
    records = [r for b in trainer.predict(model, loader(bags, store, False)) for r in b]
    label = np.array([r["label"] for r in records])
    prob = np.array([r["probability"] for r in records])
    expected = binary_metrics(label, prob, (prob >= 0.3).astype(int))
    assert expected != binary_metrics(label, prob, (prob >= 0.5).astype(int))  # 0.3 matters
    for name, value in expected.items():
        assert logged[f"val_{name}"] == pytest.approx(value, abs=1e-5), name


def test_data_the_model_was_not_built_for_is_refused_by_name() -> None:
    """A checkpoint run with another config's data: a clear DataError before any layer."""
    batch = next(iter(loader(*separable_bags(4), shuffle=False)))  # 16 px crops, 3 clinical
    n = batch.mask.shape[1]
    features = dataclasses.replace(batch, instances=torch.zeros(len(batch), n, 33))
    fewer = dataclasses.replace(batch, tabular=batch.tabular[:, :2])
    cases = [
        (AttentionMIL(encoder=features_of(33)), batch, "feature bags of 33 values"),
        (AttentionMIL(encoder=features_of(32, "mlp")), features, rf"shape \(4, {n}, 33\)"),
        (AttentionMIL(**TINY_ENCODER), features, r"image crops \[B, N, C, H, W\]"),
        (InstanceMIL(**TINY_ENCODER), features, "image crops"),
        (TabularMLP(tabular_dim=3), fewer, "2 clinical values per patient; TabularMLP was built"),
        (GatedFusionMIL(**TINY_ENCODER, tabular_dim=3), fewer, "2 clinical values"),
        (
            LogitSumMIL(in_dim=32, tabular_dim=3, image_experts=["mean"], cell_types=0),
            features,
            "32 values",
        ),
    ]
    for model, data, message in cases:
        for mode in (model.train, model.eval):
            mode()
            with pytest.raises(DataError, match=message):
                model.infer(data)
    AttentionMIL(**TINY_ENCODER).infer(fewer)  # a model of crops alone ignores the clinical size
    AttentionMIL(encoder=features_of(33)).infer(features)


def test_gated_fusion_takes_no_dropout_it_would_ignore() -> None:
    """The fusion replaces the head that ``dropout`` applies to: GatedFusionMIL does not take
    it (a format-1 checkpoint's is dropped on conversion)."""
    from lympho_mil.models.checkpoint import _settings_from_format_1

    with pytest.raises(TypeError, match="dropout"):
        GatedFusionMIL(encoder=features_of(8), tabular_dim=3, dropout=0.9)  # type: ignore[call-arg]
    converted = _settings_from_format_1({"encoder": "identity", "fusion": "gated", "dropout": 0.9})
    assert "dropout" not in converted
    assert converted["fusion"]["kind"] == "gated" and converted["encoder"]["name"] == "identity"


def test_mean_pooled_gated_fusion_scores_each_crop_with_its_image_expert() -> None:
    """Mean pooling and a linear image expert: the crop logits average to the expert's logit
    (padding excluded); predict reports them per crop. Attention pooling gives none."""
    from lympho_mil.data.batch import BagBatch

    torch.manual_seed(0)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    batch = BagBatch(
        instances=torch.randn(2, 5, 8).masked_fill(~mask.unsqueeze(-1), 1e6),
        mask=mask,
        tabular=torch.randn(2, 3),
        label=torch.tensor([1.0, 0.0]),
        bag_id=["a", "b"],
        instance_id=[[f"{i}.jpg" for i in range(5)], ["0.jpg", "1.jpg"]],
    )
    kwargs = {"encoder": features_of(8), "tabular_dim": 3, "expert_loss_weight": 1.0}
    model = GatedFusionMIL(pooling=PoolingSettings("mean"), **kwargs).eval()
    out = model(batch)
    assert out.instance_logits is not None and out.extras is not None
    assert out.instance_logits[1, 2:].eq(0).all()
    mean = out.instance_logits.sum(1) / mask.sum(1)
    torch.testing.assert_close(mean, out.extras["image_logit"])
    (a, b) = model.predict_step(batch, 0)
    assert len(a["instance_probability"]) == 5 and len(b["instance_probability"]) == 2
    attention = GatedFusionMIL(pooling=PoolingSettings("attention"), **kwargs)
    assert attention(batch).instance_logits is None


def test_logit_sum_trains_every_expert_on_the_label_by_itself() -> None:
    """The loss is the sum of the experts' own BCEs: each expert's gradient is that of its
    own loss, as if it were trained alone; the summed logit is what is scored."""
    torch.manual_seed(0)
    model = LogitSumMIL(in_dim=6, cell_types=2, tabular_dim=3, tabular_stats=STATS, pos_weight=0.5)
    features = torch.cat([torch.randn(4, 5, 4), F.one_hot(torch.randint(0, 2, (4, 5)), 2)], -1)
    batch = next(iter(loader(*separable_bags(4), shuffle=False)))
    batch = dataclasses.replace(
        batch, instances=features.float(), mask=torch.ones(4, 5, dtype=torch.bool)
    )
    out = model.infer(batch)
    assert out.extras is not None
    model.loss(out, batch).backward(retain_graph=True)
    experts = {"tabular": model.net.clinical, **model.net.images}
    for name, expert in experts.items():
        own = F.binary_cross_entropy_with_logits(
            out.extras[f"{name}_logit"], batch.label, pos_weight=torch.tensor(0.5)
        )
        wanted = torch.autograd.grad(own, list(expert.parameters()), retain_graph=True)
        for parameter, grad in zip(expert.parameters(), wanted, strict=True):
            torch.testing.assert_close(parameter.grad, grad)
    image = out.extras["mean_logit"] + out.extras["statistics_logit"] + out.extras["types_logit"]
    torch.testing.assert_close(out.logit, out.extras["tabular_logit"] + image / 3)
    model.eval()
    record, summed = model.predict_step(batch, 0)[0], model.infer(batch).logit[0]
    assert record["probability"] == pytest.approx(torch.sigmoid(summed).item())


def feature_bags(n_bags: int, seed: int) -> list[BagSample]:
    """Patients of 6 crops of 6 features (4 values, then a one-hot of 2 cell types) whose
    clinical vector and features both lean with the label."""
    rng = np.random.default_rng(seed)
    samples = []
    for b in range(n_bags):
        label = b % 2
        values = rng.normal(0.6 * label, 1.0, (6, 4))
        types = np.eye(2)[(rng.random(6) < 0.3 + 0.4 * label).astype(int)]
        features = torch.tensor(np.concatenate([values, types], axis=1), dtype=torch.float32)
        clinical = torch.tensor([label + rng.normal(0, 1.0), rng.normal(), 0.0])
        ids = [f"{i}.png" for i in range(6)]
        samples.append(BagSample(features, clinical.float(), float(label), f"P{b}", ids))
    return samples


class WeightsPerEpoch(L.Callback):
    """The network's parameters at every validation of fit (before the model's own hook)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.epochs.append({n: p.detach().clone() for n, p in module.net.named_parameters()})


def test_logit_sum_keeps_each_expert_at_its_own_best_validation_epoch() -> None:
    """Each expert's kept weights are those of the epoch of its lowest validation loss (its
    own BCE on the validation patients), and every prediction after fit uses them."""
    L.seed_everything(0)
    settings: dict[str, Any] = dict(in_dim=6, cell_types=2, tabular_dim=3, tabular_stats=STATS)
    model = LogitSumMIL(**settings, optim=OptimSettings(lr=0.05), expert_selection=True)
    train = DataLoader(feature_bags(24, 0), batch_size=8, shuffle=True, collate_fn=collate_bags)
    val = DataLoader(feature_bags(12, 1), batch_size=5, collate_fn=collate_bags)
    seen = WeightsPerEpoch()
    trainer = quiet_trainer(max_epochs=12, callbacks=[seen])
    trainer.fit(model, train, val)
    batch = collate_bags(feature_bags(12, 1))
    model.eval()
    inputs = (batch.instances, batch.mask, batch.tabular)
    bests = []
    for i, name in enumerate(["tabular", "mean", "statistics", "types"]):
        losses = torch.stack(
            [
                F.binary_cross_entropy_with_logits(
                    torch.func.functional_call(model.net, weights, inputs).extras[f"{name}_logit"],
                    batch.label,
                )
                for weights in seen.epochs
            ]
        )
        best = int(losses.argmin())
        bests.append(best)
        assert model.selected_loss[i].item() == pytest.approx(losses[best].item(), rel=1e-5)
        prefix = "clinical." if name == "tabular" else f"images.{name}."
        kept = model.selected.weights()
        for key, value in seen.epochs[best].items():
            if key.startswith(prefix):
                torch.testing.assert_close(kept[key], value)
    assert len(seen.epochs) == 12 and len(set(bests)) > 1  # the experts stop apart
    expected = torch.func.functional_call(model.net, model.selected.weights(), inputs)
    torch.testing.assert_close(model.infer(batch).logit, expected.logit)
    logged = trainer.callback_metrics  # the last validation: val_* of the kept experts
    assert logged["val_loss"].item() == pytest.approx(model.selected_loss.sum().item(), rel=1e-5)
    prob = torch.sigmoid(expected.logit).detach().numpy()
    label = batch.label.long().numpy()
    scores = binary_metrics(label, prob, (prob >= float(model.threshold)).astype(int))
    assert logged["val_balanced_accuracy"].item() == pytest.approx(scores["balanced_accuracy"])
    assert logged["val_auroc"].item() == pytest.approx(scores["auroc"])
    assert "val_live_loss" in logged and "val_live_balanced_accuracy" in logged
    again = LogitSumMIL(**settings, expert_selection=True)
    again.load_state_dict(model.state_dict())  # a checkpoint carries the kept experts
    torch.testing.assert_close(again.eval().infer(batch).logit, expected.logit)


def test_logit_sum_without_validation_keeps_its_experts_as_trained() -> None:
    """No validation ever judged them: the experts are kept as trained, with a warning,
    never the untrained starting weights."""
    L.seed_everything(0)
    model = LogitSumMIL(
        in_dim=6, cell_types=2, tabular_dim=3, tabular_stats=STATS, expert_selection=True
    )
    train = DataLoader(feature_bags(16, 0), batch_size=8, collate_fn=collate_bags)
    with pytest.warns(UserWarning, match="no validation judged the experts"):
        quiet_trainer(max_epochs=2).fit(model, train)
    batch = collate_bags(feature_bags(4, 1))
    model.eval()
    expected = model.net(batch.instances, batch.mask, batch.tabular).logit
    torch.testing.assert_close(model.infer(batch).logit, expected)


def test_logit_sum_refuses_data_whose_cell_types_it_would_misread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lympho_mil.data import SyntheticDataModule

    model = LogitSumMIL(in_dim=144, cell_types=8, tabular_dim=3)
    data = SyntheticDataModule()
    model._trainer = types.SimpleNamespace(datamodule=data)  # type: ignore[assignment]
    model.setup("fit")  # no cached features: nothing to compare
    for recorded, columns in (({"count": 16, "keep_features": True}, 16), (0, 0), (16, 144)):
        monkeypatch.setattr(data, "input_settings", lambda r=recorded: {"cell_types": r})
        with pytest.raises(DataError, match=f"end with {columns} cell-type columns"):
            model.setup("fit")
    with pytest.raises(ValueError, match="tta_views must be 1"):
        LogitSumMIL(in_dim=8, image_experts=["mean"], cell_types=0, tta_views=2)
