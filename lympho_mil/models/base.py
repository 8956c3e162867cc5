"""The base LightningModule: one pure-torch network (``self.net``) and the training concerns
around it.

A subclass builds its network in `BagClassifier.build_net`. Each concern has one home: the
loss functions in `lympho_mil.nn.loss`, metrics in `lympho_mil.models.metrics`, test-time
augmentation in `lympho_mil.nn.tta`, per-step reseeding in `lympho_mil.models.reseed`, the
checkpoint format in `lympho_mil.models.checkpoint`, the threshold rules in
`lympho_mil.models.threshold`, the optimiser and its schedule in
`lympho_mil.models.schedule`. Here: the steps (one function for train, validation and test),
the predict records and the hooks that call those homes.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, ClassVar, cast

import torch
from lightning import LightningModule
from torch import Tensor, nn

from lympho_mil.arguments import SettingError, as_settings, plain
from lympho_mil.data.batch import BagBatch
from lympho_mil.data.datamodule import BagDataModule
from lympho_mil.data.errors import DataError
from lympho_mil.models.checkpoint import CHECKPOINT_FORMAT, check_format, upgrade, write_record
from lympho_mil.models.metrics import PatientMetrics
from lympho_mil.models.reseed import reseed_step
from lympho_mil.models.schedule import OptimSettings, configure_optimizers, stretch_cosine
from lympho_mil.models.threshold import check_threshold, threshold_on_loading
from lympho_mil.nn import BagOutput, Standardize, bce_with_logits, tta_forward
from lympho_mil.nn.tta import check_tta_views

SPLITS = ("train", "val", "test")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class BagClassifier(LightningModule, ABC):
    """Base class of every model: binary patient classification from a `BagBatch` by one
    network of `lympho_mil.nn` (``self.net``, built by `build_net`).

    Args:
        tabular_dim: length T of the clinical vector (linked from the datamodule by the CLI).
        tabular_stats: ``{"mean": [...], "scale": [...]}`` fitted on the training patients
            (linked from the datamodule); carried in the checkpoint as buffers of the
            network's standardisation.
        pos_weight: weight of the positive (tumoral) class in the loss; < 1 favours the
            minority reactive class when tumoral patients dominate.
        optim: the model's own optimiser and schedule (`OptimSettings`: ``lr``,
            ``weight_decay``, ``scheduler``); LightningCLI's ``optimizer:`` and
            ``lr_scheduler:`` replace them.
        threshold: decision threshold on the probability, in (0, 1); carried in the
            checkpoint (``cv`` stores the one chosen on a fold's validation patients). Loading
            a checkpoint keeps its threshold unless ``load_from_checkpoint(path, threshold=t)``
            asks for another value than the checkpoint's own setting, or the command line
            gives ``--model.threshold t`` (any value, even the checkpoint's setting).
        tta_views: test-time augmentation: outside training (validation, test, predict), the
            patient logit, crop weights and crop logits are the means over this many exact
            views of every crop (1: none; 2: and its mirror image; 4: its four 90-degree
            rotations; 8: those and their mirror images). Costs that many forward passes;
            image crops only. ``load_from_checkpoint(path, tta_views=8)`` turns it on for a
            model trained without it. Lightning's steps go through `infer`; outside a
            Trainer, call ``model.infer(batch)`` (``model(batch)`` is one plain forward pass,
            without the views or the check of the batch).
    """

    reads_instances: ClassVar[bool] = True  # False: a clinical-only model ignores the crops
    reads_tabular: ClassVar[bool] = False  # True: the clinical vector enters the decision
    threshold: Tensor  # a buffer: saved in the checkpoint, moved with the module

    def __init__(
        self,
        tabular_dim: int = 0,
        tabular_stats: dict[str, list[float]] | None = None,
        pos_weight: float | None = None,
        optim: OptimSettings = OptimSettings(),
        threshold: float = 0.5,
        tta_views: int = 1,
    ) -> None:
        super().__init__()
        check_tta_views(tta_views)
        refusal = self.why_no_views()
        if tta_views != 1 and refusal is not None:
            raise SettingError(
                f"{type(self).__name__} {refusal}: test-time augmentation needs image crops "
                f"(tta_views must be 1, got {tta_views})"
            )
        check_threshold(threshold)
        if pos_weight is not None and pos_weight <= 0:
            raise SettingError(f"pos_weight must be > 0, got {pos_weight}")
        if tabular_dim < 0:
            raise SettingError(f"tabular_dim must be >= 0, got {tabular_dim}")
        if tabular_stats is not None and any(
            len(tabular_stats[k]) != tabular_dim for k in ("mean", "scale")
        ):
            raise SettingError(
                f"tabular_stats hold {len(tabular_stats['mean'])} means and "
                f"{len(tabular_stats['scale'])} scales but tabular_dim is {tabular_dim}"
            )
        self.tabular_dim = tabular_dim
        self.tabular_stats = tabular_stats
        self.pos_weight = pos_weight
        self.optim = as_settings(OptimSettings, optim)
        self.tta_views = tta_views
        self.threshold_setting = float(threshold)  # the buffer may change (cv); this not
        self.threshold_asked = False  # True: the setting wins over any checkpoint's threshold
        self.seen_patients: frozenset[str] | None = None  # trained or validated on (None: unknown)
        self.notes: dict[str, Any] = {}  # how these weights were evaluated, for the checkpoint
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.net = self.build_net()
        self.metrics = nn.ModuleDict({f"{s}_metrics": PatientMetrics() for s in SPLITS})
        self.save_hyperparameters()

    def why_no_views(self) -> str | None:
        """Why test-time views of the crops cannot apply to this model (None: they can);
        asked in ``__init__`` before the network is built."""
        return None if self.reads_instances else "reads no crops"

    @abstractmethod
    def build_net(self) -> nn.Module:
        """The network (a module of `lympho_mil.nn.nets`: ``net(instances, mask, tabular)``
        -> `BagOutput`), called from ``__init__`` once the base settings exist."""

    def standardize(self) -> Standardize:
        """The standardisation of the clinical vector by ``tabular_stats`` (the identity
        without them), for a network that reads it."""
        n = self.tabular_dim
        stats = self.tabular_stats or {"mean": [0.0] * n, "scale": [1.0] * n}
        return Standardize(stats["mean"], stats["scale"])

    def _set_hparams(self, hp: Any) -> None:
        """Lightning records the constructor's arguments through here: settings dataclasses
        are kept as plain dicts, so checkpoints load with ``weights_only`` and logs stay
        plain YAML."""
        if isinstance(hp, Mapping):
            hp = {k: plain(v) for k, v in hp.items()}
        super()._set_hparams(hp)

    def forward(self, batch: BagBatch) -> BagOutput:
        """The network's output for ``batch`` (one plain pass: no test-time views)."""
        return cast(BagOutput, self.net(batch.instances, batch.mask, batch.tabular))

    def check_batch(self, batch: BagBatch) -> None:
        """Refuse data the model was not built for (e.g. a checkpoint run with another
        config's data), before it fails deep inside a layer."""
        found = batch.tabular.shape[-1]
        if self.reads_tabular and found != self.tabular_dim:
            raise DataError(
                f"the data gives {found} clinical values per patient; {type(self).__name__} "
                f"was built for {self.tabular_dim}: use the data settings it was trained with"
            )
        self.check_instances(batch)

    def check_instances(self, batch: BagBatch) -> None:
        """Refuse instances of a shape the model cannot read (models of crops override)."""

    def infer(self, batch: BagBatch) -> BagOutput:
        """`forward`; outside training, averaged over ``tta_views`` views of the crops.
        Every step goes through here, after `check_batch`."""
        self.check_batch(batch)
        if self.training or self.tta_views == 1:
            return self(batch)
        return tta_forward(self.net, batch.instances, batch.mask, batch.tabular, self.tta_views)

    def loss(self, out: BagOutput, batch: BagBatch) -> Tensor:
        """Mean BCE on the patient logits, optionally class-weighted."""
        return bce_with_logits(out.logit, batch.label, self.pos_weight)

    # -- steps -----------------------------------------------------------------------------
    def _shared_step(self, batch: BagBatch, split: str) -> Tensor:
        if not batch.instances.is_floating_point():
            raise TypeError(
                f"{batch.instances.dtype} instances (raw crops or row numbers) reached the "
                "model: a PatientBagDataModule(augment='gpu') turns them into normalised crops "
                "in its on_after_batch_transfer hook, so pass it to the Trainer as "
                "datamodule=..., not its loaders"
            )
        out = self.infer(batch)
        loss = self.loss(out, batch)
        if split == "train" and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}, "
                f"epoch {self.current_epoch}, batch of patients {batch.bag_id}; lower the "
                "learning rate or check these patients' inputs"
            )
        prob = torch.sigmoid(out.logit.detach().float())
        predicted = (prob >= self.threshold).long()
        self._metrics(split).update(prob, predicted, batch.label, loss)
        return loss

    def training_step(self, batch: BagBatch, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: BagBatch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: BagBatch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _metrics(self, split: str) -> PatientMetrics:
        return cast(PatientMetrics, self.metrics[f"{split}_metrics"])

    def _log_metrics(self, split: str, name: str | None = None) -> None:
        """Log and reset the metrics of ``split``, as ``<name or split>_<metric>``."""
        metrics = self._metrics(split)
        seen = bool(metrics.auroc.update_count)
        if self._trainer is not None:  # every process decides alike (compute synchronises)
            seen = self.trainer.strategy.reduce_boolean_decision(seen, all=False)
        if not seen:  # an epoch end without a batch: Lightning replays one on resuming with
            return  # max_steps
        values = metrics.compute()
        self.log_dict(
            {f"{name or split}_{k}": v for k, v in values.items()},
            prog_bar=split != "train" and name is None,
            sync_dist=False,  # torchmetrics already synchronised the states exactly
        )
        self._metrics(split).reset()

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: BagBatch, batch_idx: int) -> list[dict[str, Any]]:
        """One record per patient: ``id``, ``label``, ``probability``, ``threshold``,
        ``n_instances``, ``instance_ids`` (the crop files) and, per crop, ``weights`` and
        ``instance_probability`` (None where the model has none)."""
        out = self.infer(batch)
        prob = torch.sigmoid(out.logit.float()).cpu()
        weights = out.weights.float().cpu() if out.weights is not None else None
        crop_prob = (
            torch.sigmoid(out.instance_logits.float()).cpu()
            if out.instance_logits is not None
            else None
        )
        seen = self.seen_patients
        records = []
        for i, pid in enumerate(batch.bag_id):
            n = len(batch.instance_id[i])
            records.append(
                {
                    "id": pid,
                    "label": int(batch.label[i].item()),
                    "probability": float(prob[i]),
                    "threshold": float(self.threshold),
                    "n_instances": n,
                    "instance_ids": batch.instance_id[i],
                    "weights": weights[i, :n].tolist() if weights is not None else None,
                    "instance_probability": (
                        crop_prob[i, :n].tolist() if crop_prob is not None else None
                    ),
                    "in_sample": None if seen is None else pid in seen,
                }
            )
        return records

    # -- reproducibility and checkpoints --------------------------------------------------
    def on_train_batch_start(self, batch: BagBatch, batch_idx: int) -> None:
        reseed_step(self.current_epoch, batch_idx)

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]  # set at run time
        if isinstance(datamodule, BagDataModule):
            record = datamodule.checkpoint_record()
            self.seen_patients = frozenset(record["train_ids"] + record["val_ids"])

    def run_record(self) -> dict[str, Any]:
        """What a checkpoint records of its run: the data (settings, training and validation
        patients), the validation scores of the epoch that wrote it and `notes` (how a
        threshold was chosen, on which patients)."""
        record: dict[str, Any] = {"saved": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(datamodule, BagDataModule):
            record["data"] = datamodule.checkpoint_record()
        if trainer is not None:
            metrics = trainer.callback_metrics.items()
            scores = {k: float(v) for k, v in metrics if k.startswith("val_") and v.numel() == 1}
            if scores:
                record["validation"] = scores
        return {**record, **self.notes}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = {"class": type(self).__name__, "threshold_setting": self.threshold_setting}
        write_record(checkpoint, {**record, **self.run_record()})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = check_format(checkpoint)  # converts an earlier format's weights in place
        data = meta.get("data") or {}
        if "train_ids" in data:
            self.seen_patients = frozenset(data["train_ids"] + data.get("val_ids", []))
        threshold = self.threshold_from(checkpoint)
        if threshold is not None:
            checkpoint["state_dict"]["threshold"] = torch.tensor(threshold)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's, for checkpoints of any format `lympho_mil.models.checkpoint` reads:
        one of an earlier format is converted in memory before the model is built from its
        settings (the file stays as it is)."""
        if isinstance(checkpoint_path, (str, os.PathLike)):
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            if checkpoint.get("lympho_mil", {}).get("format") != CHECKPOINT_FORMAT:
                buffer = io.BytesIO()
                torch.save(upgrade(checkpoint), buffer)
                checkpoint_path = io.BytesIO(buffer.getvalue())
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def threshold_from(self, checkpoint: dict[str, Any]) -> float | None:
        """The threshold that replaces a checkpoint's own on loading, or None to keep it
        (`lympho_mil.models.threshold.threshold_on_loading`)."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        saved = check_format(checkpoint).get("threshold_setting")  # None: older versions
        return threshold_on_loading(saved, self.threshold_setting, self.threshold_asked, fitting)

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, self.optim)

    def on_train_start(self) -> None:
        stretch_cosine(self.trainer)
