"""Patient-level classification metrics (torchmetrics), one collection per split."""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryF1Score,
    BinaryRecall,
    BinarySpecificity,
    BinaryStatScores,
)

METRIC_NAMES = ("balanced_accuracy", "auroc", "sensitivity", "specificity", "f1")


class BinaryBalancedAccuracy(BinaryStatScores):
    """Mean of sensitivity and specificity (the challenge metric); as scikit-learn, the mean
    over the classes present only (the recall of the one class when the other is absent)."""

    def compute(self) -> Tensor:
        tp, fp, tn, fn = self._final_state()
        positives, negatives = tp + fn, tn + fp
        recalls = tp / positives.clamp(min=1) + tn / negatives.clamp(min=1)
        present = (positives > 0).long() + (negatives > 0).long()
        return recalls.float() / present.clamp(min=1)


class PatientMetrics(nn.Module):
    """All patient metrics from ``(prob[B], predicted[B] in {0, 1}, target[B])``.

    Threshold-dependent metrics read the predicted labels, so the decision threshold can
    change (e.g. chosen on inner validation) without rebuilding the metrics; AUROC reads the
    probabilities. Each metric synchronises its states across processes under DDP.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_label = MetricCollection(
            {
                "balanced_accuracy": BinaryBalancedAccuracy(),
                "sensitivity": BinaryRecall(),
                "specificity": BinarySpecificity(),
                "f1": BinaryF1Score(),
            }
        )
        self.auroc = BinaryAUROC()
        self.loss = MeanMetric()

    def update(self, prob: Tensor, predicted: Tensor, target: Tensor, loss: Tensor) -> None:
        """``loss`` is the batch's mean loss; it is averaged weighted by batch size."""
        target = target.long()
        self.by_label.update(predicted.long(), target)
        self.auroc.update(prob.float(), target)
        self.loss.update(loss.detach().float(), weight=len(target))

    def compute(self) -> dict[str, Tensor]:
        """`METRIC_NAMES` and ``loss`` (the mean over patients, exact under DDP)."""
        out = dict(self.by_label.compute())
        out["auroc"] = self.auroc.compute()
        return {**{name: out[name] for name in METRIC_NAMES}, "loss": self.loss.compute()}

    def reset(self) -> None:
        self.by_label.reset()
        self.loss.reset()
        self.auroc.reset()
