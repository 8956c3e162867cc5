"""Clinical expert plus image experts, their logits added (`LogitSumMIL`), each expert kept
at its own best validation epoch (`ExpertSnapshot`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call

from lympho_mil.arguments import SettingError, check_positive
from lympho_mil.data.batch import BagBatch
from lympho_mil.data.datamodule import BagDataModule
from lympho_mil.data.errors import DataError
from lympho_mil.models.base import BagClassifier, BagOutput
from lympho_mil.models.fusion import CLINICAL_DROPOUT
from lympho_mil.nn import (
    FeatureColumns,
    LogitSumNet,
    MeanPooling,
    MILNet,
    MLPEncoder,
    StatisticsPooling,
    TabularNet,
    bce_with_logits,
)

IMAGE_EXPERTS = ("mean", "statistics", "types")
"""The image experts of `LogitSumMIL`: a linear model of the mean of the crops' features, of
their statistics (mean, standard deviation and 10/50/90 % quantiles), or of the patient's
share of each cell type (the mean of the crops' one-hot types)."""

LIVE = "val_live"
"""The prefix of the validation metrics of `LogitSumMIL`'s weights in training (with
``expert_selection``; its ``val_*`` metrics are those of the experts it keeps)."""


class ExpertSnapshot(nn.Module):
    """A copy of a network's parameters held as buffers: saved in checkpoints and moved with
    the model, never trained. `weights` feeds ``torch.func.functional_call``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.names = [name for name, _ in net.named_parameters()]
        for name, parameter in net.named_parameters():
            self.register_buffer(self._key(name), parameter.detach().clone())

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @torch.no_grad()
    def copy_from(self, net: nn.Module, prefix: str) -> None:
        """Take ``net``'s current parameters whose names start with ``prefix``."""
        for name, parameter in net.named_parameters():
            if name.startswith(prefix):
                getattr(self, self._key(name)).copy_(parameter)

    def weights(self) -> dict[str, Tensor]:
        """The held parameters by the network's names."""
        return {name: getattr(self, self._key(name)) for name in self.names}


class LogitSumMIL(BagClassifier):
    """Clinical expert plus image experts, their logits added (`lympho_mil.nn.LogitSumNet`):
    ``logit = s_tab + mean_k s_img_k``, each expert trained on the label by itself (the loss
    is the sum of the experts' BCEs; the summed logit is what is scored and thresholded).

    Reads cached crop features ``float[B, N, in_dim]`` whose last ``cell_types`` columns are
    each crop's one-hot cell type (`lympho_mil.features.CachedFeatureDataModule` with
    ``cell_types: {count: K, keep_features: true}``); ``mean`` and ``statistics`` read the
    first ``in_dim - cell_types`` columns, ``types`` the last ``cell_types``. The clinical
    expert is `TabularMLP`'s network.

    With ``expert_selection``, each expert is kept at the epoch of its own lowest validation
    loss, as if it had been trained and checkpointed alone: the experts overfit at different
    speeds. The kept weights (`ExpertSnapshot`, in the checkpoint) make every prediction
    outside fit's validation, which judges the weights in training. The ``val_*`` metrics
    describe the kept experts, the model as it predicts (``val_loss``, the sum of each
    expert's lowest validation BCE, only falls: checkpoint on it, ``mode: min``); the weights
    in training are logged as `LIVE` ``_*``.

    Args:
        in_dim: values per crop (the datamodule's ``feature_dim``).
        image_experts: names of the image experts, among `IMAGE_EXPERTS`.
        cell_types: K, the one-hot cell-type columns at the end of each crop's vector (the
            data's ``cell_types.count``; 0 without the ``types`` expert, which needs K > 0).
        clinical_hidden, clinical_embed_dim: sizes of the clinical MLP (dropout 0.1).
        expert_selection: keep each expert at its own best validation epoch (False: the whole
            model at the checkpoint's epoch, the twentieth round's form in docs/results.md,
            which lost 0.034 and 0.043 of balanced accuracy to the same experts trained apart).
        **kwargs: settings of `BagClassifier` (``tabular_dim`` must be > 0).
    """

    reads_tabular = True
    selected_loss: Tensor  # a buffer: each expert's lowest validation loss so far

    def __init__(
        self,
        in_dim: int,
        image_experts: Sequence[str] = IMAGE_EXPERTS,
        cell_types: int = 16,
        clinical_hidden: int = 16,
        clinical_embed_dim: int = 8,
        expert_selection: bool = True,
        **kwargs: Any,
    ) -> None:
        check_positive(
            in_dim=in_dim, clinical_hidden=clinical_hidden, clinical_embed_dim=clinical_embed_dim
        )
        experts = list(image_experts)
        unknown = sorted(set(experts) - set(IMAGE_EXPERTS))
        if not experts or unknown or len(set(experts)) != len(experts):
            raise SettingError(
                f"image_experts must be distinct names among {IMAGE_EXPERTS}, got {experts}"
            )
        features = in_dim - cell_types
        if cell_types < 0 or features < 0 or ("types" in experts) != (cell_types > 0):
            raise SettingError(
                f"cell_types must be in [0, in_dim] and positive exactly when the 'types' expert "
                f"is used, got {cell_types} (in_dim {in_dim}, image_experts {experts})"
            )
        if features == 0 and set(experts) - {"types"}:
            raise SettingError(
                f"the 'mean' and 'statistics' experts need feature columns besides the "
                f"{cell_types} cell types (in_dim {in_dim})"
            )
        self.in_dim, self.image_experts, self.n_cell_types = in_dim, experts, cell_types
        self.clinical_hidden, self.clinical_embed_dim = clinical_hidden, clinical_embed_dim
        self.expert_selection = expert_selection
        super().__init__(**kwargs)
        self.experts = ["tabular", *experts]
        self.selected = ExpertSnapshot(self.net) if expert_selection else None
        if expert_selection:
            self.register_buffer("selected_loss", torch.full((len(self.experts),), float("inf")))
        self._judged: list[tuple[Tensor, Tensor, Tensor]] = []  # this validation's logits

    def why_no_views(self) -> str:
        return "reads feature vectors, which have no orientation"

    def build_net(self) -> LogitSumNet:
        if self.tabular_dim < 1:
            raise SettingError("LogitSumMIL needs a clinical vector (tabular_dim >= 1)")
        clinical = TabularNet(
            self.standardize(),
            MLPEncoder(
                self.tabular_dim, self.clinical_hidden, self.clinical_embed_dim, CLINICAL_DROPOUT
            ),
        )
        features = self.in_dim - self.n_cell_types
        images: dict[str, nn.Module] = {}
        for name in self.image_experts:
            if name == "types":
                images[name] = MILNet(FeatureColumns(features, self.in_dim), MeanPooling())
            else:
                pooling = MeanPooling() if name == "mean" else StatisticsPooling()
                images[name] = MILNet(FeatureColumns(0, features), pooling)
        return LogitSumNet(clinical, images)

    def check_instances(self, batch: BagBatch) -> None:
        shape = tuple(batch.instances.shape)
        if len(shape) != 3 or shape[-1] != self.in_dim:
            raise DataError(
                f"LogitSumMIL reads feature bags of {self.in_dim} values per crop but the data "
                f"gives instances of shape {shape}: use the data settings it was trained with, "
                "or set in_dim to the data's feature size"
            )

    def _judging(self) -> bool:
        """In fit's validation, where the weights in training are judged expert by expert."""
        trainer = self._trainer
        return trainer is not None and trainer.validating and trainer.state.fn == "fit"

    def _kept_output(self, batch: BagBatch) -> BagOutput:
        inputs = (batch.instances, batch.mask, batch.tabular)
        assert self.selected is not None
        return functional_call(self.net, self.selected.weights(), inputs)  # type: ignore[no-any-return]

    def forward(self, batch: BagBatch) -> BagOutput:
        """The network's output; with ``expert_selection``, outside training and fit's
        validation, that of the kept experts."""
        if self.selected is not None and not self.training and not self._judging():
            return self._kept_output(batch)
        return super().forward(batch)

    def expert_logits(self, out: BagOutput) -> Tensor:
        """``float[B, E]``: each expert's logit (clinical first), from a network output."""
        assert out.extras is not None
        return torch.stack([out.extras[f"{n}_logit"] for n in self.experts], dim=1)

    def loss(self, out: BagOutput, batch: BagBatch) -> Tensor:
        """The sum of every expert's own BCE (clinical and each image expert)."""
        logits = self.expert_logits(out)
        return sum(
            (bce_with_logits(column, batch.label, self.pos_weight) for column in logits.T),
            torch.zeros((), device=logits.device),
        )

    def validation_step(self, batch: BagBatch, batch_idx: int) -> None:
        """The weights in training, scored (`LIVE`); in fit, each expert's logits of these
        weights and of the kept ones, for the choice at the epoch's end."""
        if self.selected is not None and self._judging():
            self.check_batch(batch)
            with torch.no_grad():
                live = self.expert_logits(self.net(batch.instances, batch.mask, batch.tabular))
                kept = self.expert_logits(self._kept_output(batch))
            self._judged.append((live.float(), kept.float(), batch.label))
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._judged = []

    def on_validation_epoch_end(self) -> None:
        """In fit: keep every expert whose validation loss is its lowest so far, and log the
        kept experts' metrics as ``val_*`` (the weights in training as `LIVE` ``_*``)."""
        if self.selected is None or not self._judging():
            super().on_validation_epoch_end()
            return
        self._log_metrics("val", name=LIVE)
        device = self.selected_loss.device
        if self._judged:
            parts = zip(*self._judged, strict=True)
            live, kept, labels = (torch.cat(part).to(device) for part in parts)
        else:  # this process saw no batch; it still joins the reduction
            live = kept = torch.zeros(0, len(self.experts), device=device)
            labels = torch.zeros(0, device=device)
        self._judged = []
        losses = self._reduced_losses(live, labels)
        if losses is None:
            return
        improved = losses < self.selected_loss
        for i in improved.nonzero().flatten().tolist():
            self.selected_loss[i] = losses[i]
            self.selected.copy_from(self.net, self._prefix(self.experts[i]))
        chosen = torch.where(improved, live, kept)  # [P, E]: the kept experts' logits
        logit = chosen[:, 0] + chosen[:, 1:].mean(dim=1)
        prob = torch.sigmoid(logit)
        if len(labels):
            predicted = (prob >= self.threshold).long()
            self._metrics("val").update(prob, predicted, labels, self.selected_loss.sum())
        self._log_metrics("val")

    def _reduced_losses(self, live: Tensor, labels: Tensor) -> Tensor | None:
        """Each expert's validation BCE over every process's patients (``float[E]``), or None
        without any; every process reduces, even one without a batch."""
        sums = torch.stack(
            [
                bce_with_logits(column, labels, self.pos_weight) * len(labels)
                if len(labels)
                else torch.zeros((), device=live.device)
                for column in live.T
            ]
        )
        strategy = self.trainer.strategy
        sums = strategy.reduce(sums, reduce_op="sum")
        count = strategy.reduce(
            torch.tensor(float(len(labels)), device=sums.device), reduce_op="sum"
        )
        return sums / count if count > 0 else None

    @staticmethod
    def _prefix(expert: str) -> str:
        return "clinical." if expert == "tabular" else f"images.{expert}."

    def setup(self, stage: str) -> None:
        """Refuse data whose cell-type columns are not the ones this model reads."""
        datamodule = getattr(self._trainer, "datamodule", None)
        if not isinstance(datamodule, BagDataModule):
            return
        recorded = datamodule.input_settings().get("cell_types")
        if recorded is None:  # not a datamodule of cached features
            return
        # {count, keep_features}: the last `count` columns; a bare count K > 0: types alone
        columns = recorded["count"] if isinstance(recorded, dict) else self.in_dim * bool(recorded)
        if columns != self.n_cell_types:
            raise DataError(
                f"the data's crops end with {columns} cell-type columns but LogitSumMIL was built "
                f"with cell_types {self.n_cell_types}: set model.cell_types to the data's "
                "cell_types.count (with keep_features: true)"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        callback = self.trainer.checkpoint_callback
        monitored = isinstance(callback, ModelCheckpoint) and callback.monitor is not None
        if self.selected is not None and monitored:
            assert isinstance(callback, ModelCheckpoint)
            if callback.monitor != "val_loss" or callback.mode != "min":
                rank_zero_warn(
                    "LogitSumMIL keeps each expert at its own best validation epoch: checkpoint "
                    "on val_loss with mode min (checkpoint.monitor, checkpoint.mode), not "
                    f"{callback.monitor} ({callback.mode}), or the best checkpoint may miss "
                    "later choices"
                )

    def on_fit_end(self) -> None:
        """An expert never judged (no validation ran) is kept as trained, with a warning."""
        if self.selected is None:
            return
        unjudged = [
            n for i, n in enumerate(self.experts) if not torch.isfinite(self.selected_loss[i])
        ]
        for name in unjudged:
            self.selected.copy_from(self.net, self._prefix(name))
        if unjudged:
            rank_zero_warn(
                f"LogitSumMIL: no validation judged the experts {unjudged}; they are kept as "
                "trained (give validation patients to keep each at its best epoch)"
            )
