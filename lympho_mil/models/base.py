"""The base LightningModule: loss, metrics, optimiser, steps and the predict output.

Subclasses build their networks in `BagClassifier.configure_models` and compute a
`BagOutput` in `BagClassifier.forward`; everything else lives here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn

from lympho_mil.arguments import SettingError, check_positive
from lympho_mil.data.batch import BagBatch
from lympho_mil.data.datamodule import BagDataModule
from lympho_mil.data.errors import DataError
from lympho_mil.models.metrics import PatientMetrics
from lympho_mil.nn import Standardize, dihedral_views
from lympho_mil.nn.tta import check_tta_views

SPLITS = ("train", "val", "test")


class BagOutput(NamedTuple):
    """What every model's forward returns.

    logit: float[B], the patient-level logit (probability = sigmoid(logit)).
    weights: float[B, N] or None, each crop's share of the decision (sums to 1 over the real
        crops, 0 on padding): attention for attention pooling, uniform for mean pooling, the
        share of embedding dimensions whose maximum the crop holds for max pooling.
    instance_logits: float[B, N] or None, per-crop logits where the model has them.
    extras: model-specific tensors (e.g. the fusion gate), float[B] each.
    """

    logit: Tensor
    weights: Tensor | None = None
    instance_logits: Tensor | None = None
    extras: dict[str, Tensor] | None = None


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class CheckpointFormatError(ValueError):
    """A checkpoint lacks lympho-mil's format marker or carries another version."""


CHECKPOINT_FORMAT = 1
"""Version of what `BagClassifier` adds to a checkpoint (``checkpoint["lympho_mil"]``)."""


class BagClassifier(LightningModule, ABC):
    """Base class of every model: binary patient classification from a `BagBatch`.

    Args:
        tabular_dim: length T of the clinical vector (linked from the datamodule by the CLI).
        tabular_stats: ``{"mean": [...], "scale": [...]}`` fitted on the training patients
            (linked from the datamodule); carried in the checkpoint as buffers.
        pos_weight: weight of the positive (tumoral) class in the loss; < 1 favours the
            minority reactive class when tumoral patients dominate.
        lr, weight_decay: AdamW settings (``--optimizer`` on the CLI replaces them).
        scheduler: "cosine" (annealed over ``trainer.max_epochs``, or per step over
            ``max_steps`` when no epoch count is set) or "none".
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
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: Literal["cosine", "none"] = "cosine",
        threshold: float = 0.5,
        tta_views: int = 1,
    ) -> None:
        super().__init__()
        check_tta_views(tta_views)
        if tta_views != 1 and not self.reads_instances:
            raise SettingError(
                f"{type(self).__name__} reads no crops: test-time augmentation has nothing to "
                f"act on (tta_views must be 1, got {tta_views})"
            )
        if not 0.0 < threshold < 1.0:
            raise SettingError(f"threshold must be in (0, 1), got {threshold}")
        if pos_weight is not None and pos_weight <= 0:
            raise SettingError(f"pos_weight must be > 0, got {pos_weight}")
        if scheduler not in ("cosine", "none"):
            raise SettingError(f"scheduler must be 'cosine' or 'none', got {scheduler!r}")
        check_positive(lr=lr)
        if weight_decay < 0 or tabular_dim < 0:
            raise SettingError(
                f"weight_decay and tabular_dim must be >= 0, got {weight_decay} and {tabular_dim}"
            )
        if tabular_stats is not None and any(
            len(tabular_stats[k]) != tabular_dim for k in ("mean", "scale")
        ):
            raise SettingError(
                f"tabular_stats hold {len(tabular_stats['mean'])} means and "
                f"{len(tabular_stats['scale'])} scales but tabular_dim is {tabular_dim}"
            )
        self.tabular_dim = tabular_dim
        self.pos_weight = pos_weight
        self.lr = lr
        self.weight_decay = weight_decay
        self.scheduler = scheduler
        self.tta_views = tta_views
        self.threshold_setting = float(threshold)  # the buffer may change (cv); this not
        self.threshold_asked = False  # True: the setting wins over any checkpoint's threshold
        self.seen_patients: frozenset[str] | None = None  # trained or validated on (None: unknown)
        self.notes: dict[str, Any] = {}  # how these weights were evaluated, for the checkpoint
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        stats = tabular_stats or {"mean": [0.0] * tabular_dim, "scale": [1.0] * tabular_dim}
        self.standardize = Standardize(stats["mean"], stats["scale"])
        self.configure_models()
        self.metrics = nn.ModuleDict({f"{s}_metrics": PatientMetrics() for s in SPLITS})

    @abstractmethod
    def configure_models(self) -> None:
        """Build the networks (called from ``__init__`` once the base settings exist)."""

    @abstractmethod
    def forward(self, batch: BagBatch) -> BagOutput:
        """The patient logits (and crop weights, where the model has them) of ``batch``."""

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
        outs = [
            self(dataclasses.replace(batch, instances=view))
            for view in dihedral_views(batch.instances, self.tta_views)
        ]
        return mean_output(outs)

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

    def _log_metrics(self, split: str) -> None:
        metrics = self._metrics(split)
        seen = bool(metrics.auroc.update_count)
        if self._trainer is not None:  # every process decides alike (compute synchronises)
            seen = self.trainer.strategy.reduce_boolean_decision(seen, all=False)
        if not seen:  # an epoch end without a batch: Lightning replays one on resuming with
            return  # max_steps
        values = metrics.compute()
        self.log_dict(
            {f"{split}_{k}": v for k, v in values.items()},
            prog_bar=split != "train",
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
        """Under ``seed_everything``, reseed torch from (seed, epoch, batch): dropout and any
        other model randomness of a step is then the same in a resumed run as in an
        uninterrupted one (the data side does the same, see ``EpochSeededSampler``)."""
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            step_seed = (int(seed) * 1_000_003 + self.current_epoch) * 1_000_003 + batch_idx
            torch.manual_seed(step_seed % 2**63)  # any seed_everything seed (up to 2**32 - 1)

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
        checkpoint["lympho_mil"] = {
            "format": CHECKPOINT_FORMAT,
            "class": type(self).__name__,
            "threshold_setting": self.threshold_setting,
            **self.run_record(),
        }
        hparams = checkpoint.get("hyper_parameters", {})
        if hparams.get("encoder_weights") is not None:
            # the state dict holds the weights: reloading must not need the initial file, nor
            # ask for pretrained weights (which, without the file, would be a download)
            checkpoint["lympho_mil"]["initial_encoder_weights"] = hparams["encoder_weights"]
            kwargs = dict(hparams.get("encoder_kwargs") or {})
            if kwargs.get("pretrained"):
                kwargs["pretrained"] = False
            checkpoint["hyper_parameters"] = {  # a copy: the model's own stay as they are
                **hparams,
                "encoder_weights": None,
                **({"encoder_kwargs": kwargs} if "encoder_kwargs" in hparams else {}),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = check_format(checkpoint)
        data = meta.get("data") or {}
        if "train_ids" in data:
            self.seen_patients = frozenset(data["train_ids"] + data.get("val_ids", []))
        threshold = self.threshold_from(checkpoint)
        if threshold is not None:
            checkpoint["state_dict"]["threshold"] = torch.tensor(threshold)

    def threshold_from(self, checkpoint: dict[str, Any]) -> float | None:
        """The threshold that replaces a checkpoint's own on loading, or None to keep it.

        A threshold other than the checkpoint's own setting asked for (or any, on the command
        line) wins over the one it carries (e.g. chosen on validation patients by ``fit`` or
        ``cv``); and training, resumed from it, evaluates at the setting, as it did before.
        """
        saved = check_format(checkpoint).get("threshold_setting")  # None: older versions
        if self.threshold_asked or (saved is not None and self.threshold_setting != saved):
            return self.threshold_setting
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        return saved if fitting and saved is not None else None

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler == "none":
            return optimizer
        horizon, interval = self._cosine_horizon()
        cosine = ModelCosine(optimizer, T_max=horizon)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": interval}}

    def _cosine_horizon(self) -> tuple[int, str]:
        """The cosine's length and unit: ``trainer.max_epochs`` epochs, or, with a step budget
        (``max_steps``) instead of epochs, that many steps."""
        epochs = self.trainer.max_epochs if self._trainer else 1
        if epochs is not None and epochs > 0:
            return epochs, "epoch"
        steps = self.trainer.estimated_stepping_batches
        if math.isinf(steps):
            raise ValueError(
                "scheduler='cosine' anneals over trainer.max_epochs or max_steps, and neither "
                "is set (max_epochs=-1 trains without end): set one, or scheduler='none'"
            )
        return max(1, int(steps)), "step"

    def on_train_start(self) -> None:
        """A resumed run that asks for another length than the checkpoint's (``fit
        --ckpt_path ... --trainer.max_epochs`` more) stretches the cosine over the new length,
        from where the run stands; otherwise the restored schedule, already at its end, would
        train the extra epochs at a learning rate of 0. The run's progress is counted in the
        new length's unit, so a run resumed with a step budget instead of an epoch count (or
        the reverse) goes on from where it stands. Only the model's own cosine: a scheduler
        given another way (LightningCLI's ``--lr_scheduler``) keeps its length."""
        for config in self.trainer.lr_scheduler_configs:
            cosine = config.scheduler
            if not isinstance(cosine, ModelCosine):
                continue
            horizon, interval = self._cosine_horizon()
            trainer = self.trainer
            progress = trainer.global_step if interval == "step" else trainer.current_epoch
            if cosine.T_max == horizon and cosine.last_epoch == progress:
                continue
            cosine.T_max, cosine.last_epoch = horizon, progress
            done = min(progress, horizon)
            for group, base in zip(cosine.optimizer.param_groups, cosine.base_lrs, strict=True):
                group["lr"] = (
                    cosine.eta_min
                    + (base - cosine.eta_min) * (1 + math.cos(math.pi * done / horizon)) / 2
                )
            cosine._last_lr = [group["lr"] for group in cosine.optimizer.param_groups]


def check_format(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The lympho-mil record of a checkpoint (``checkpoint["lympho_mil"]``);
    `CheckpointFormatError` when it has none or one of another format version."""
    meta = checkpoint.get("lympho_mil")
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointFormatError(
            f"checkpoint format {found!r} is not the one this lympho-mil reads "
            f"({CHECKPOINT_FORMAT}); was it written by lympho-mil?"
        )
    return meta


class ModelCosine(torch.optim.lr_scheduler.CosineAnnealingLR):
    """The cosine of ``scheduler="cosine"``: the one `BagClassifier.on_train_start`
    may stretch."""


def mean_output(outs: list[BagOutput]) -> BagOutput:
    """The element-wise mean of the outputs of several views of one batch."""

    def mean(tensors: list[Tensor | None]) -> Tensor:
        present = [t for t in tensors if t is not None]
        if len(present) != len(tensors):
            raise ValueError("the views' outputs differ in which fields they hold")
        return torch.stack(present).mean(0)

    first = outs[0]
    return BagOutput(
        logit=mean([o.logit for o in outs]),
        weights=None if first.weights is None else mean([o.weights for o in outs]),
        instance_logits=(
            None if first.instance_logits is None else mean([o.instance_logits for o in outs])
        ),
        extras=(
            None
            if first.extras is None
            else {k: mean([(o.extras or {}).get(k) for o in outs]) for k in first.extras}
        ),
    )


def bce_with_logits(logit: Tensor, target: Tensor, pos_weight: float | None) -> Tensor:
    """BCE on logits in float32; ``pos_weight`` scales the positive class's term."""
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=logit.device)
    return F.binary_cross_entropy_with_logits(logit.float(), target.float(), pos_weight=weight)
