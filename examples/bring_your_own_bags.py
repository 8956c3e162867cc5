"""Bring your own bags: feature vectors in numpy arrays, the same models and Trainer.

    python examples/bring_your_own_bags.py                   # tiny: 60 bags, 3 epochs
    python examples/bring_your_own_bags.py --bags 400 --epochs 30

Any dataset that can be put as ``features[M, D]`` (one row per instance), ``bag_ids[M]`` and
instance ``labels[M]`` (a bag is positive when any of its instances is) plugs in by
overriding :meth:`FeatureBagDataModule.read_source`. Here the arrays are a toy problem:
positive bags hide one to three "witness" instances drawn from a shifted distribution among
ordinary ones. After training, the attention weights of held-out bags are scored against the
(here known) witness flags.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import numpy as np
from sklearn.metrics import roc_auc_score

from lympho_mil import AttentionMIL
from lympho_mil.data import (
    FeatureBagDataModule,
    FeatureBags,
    LoaderSettings,
    SplitSettings,
    bags_from_arrays,
)
from lympho_mil.nn import EncoderSettings


class ArrayBagDataModule(FeatureBagDataModule):
    """Bags from in-memory arrays; split, standardisation and loaders as the base class."""

    def __init__(
        self, features: np.ndarray, bag_ids: np.ndarray, labels: np.ndarray, **kwargs: Any
    ) -> None:
        super().__init__(path="<arrays>", **kwargs)
        self.arrays = (features, bag_ids, labels)

    def read_source(self) -> FeatureBags:
        return bags_from_arrays(*self.arrays)


def toy_bags(n_bags: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``features[M, dim]``, ``bag_ids[M]``, instance ``labels[M]`` (1 = witness)."""
    rng = np.random.default_rng(seed)
    shift = rng.normal(size=dim)
    shift *= 2.5 / np.linalg.norm(shift)
    features, bag_ids, labels = [], [], []
    for bag in range(n_bags):
        n = int(rng.integers(5, 15))
        witness = np.zeros(n, dtype=int)
        if bag % 2:
            witness[rng.choice(n, int(rng.integers(1, 4)), replace=False)] = 1
        features.append(rng.normal(size=(n, dim)) + witness[:, None] * shift)
        bag_ids += [f"bag{bag:03d}"] * n
        labels.append(witness)
    return np.concatenate(features), np.array(bag_ids), np.concatenate(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=60)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    L.seed_everything(args.seed, verbose=False)

    features, bag_ids, labels = toy_bags(args.bags, args.dim, args.seed)
    split = SplitSettings(val_fraction=0.2, test_fraction=0.25)
    data = ArrayBagDataModule(
        features, bag_ids, labels, loader=LoaderSettings(batch_size=8), split=split
    )
    encoder = EncoderSettings("mlp", out_dim=32, in_dim=data.in_dim)
    model = AttentionMIL(encoder=encoder, attention_hidden=16)
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", enable_checkpointing=False, **quiet
    )
    trainer.fit(model, data)
    (metrics,) = trainer.test(model, data, verbose=False)
    print(f"{len(data.bags)} bags, {len(features)} instances of {data.in_dim} features")
    print(
        f"test bags: balanced accuracy {metrics['test_balanced_accuracy']:.3f}, "
        f"AUROC {metrics['test_auroc']:.3f}"
    )

    # Attention against the witness flags, inside the held-out positive bags. Instance ids
    # of array bags are their row numbers; predict records carry each bag's weights.
    predictor = L.Trainer(accelerator="cpu", **quiet)
    records = [
        r
        for batch in predictor.predict(model, dataloaders=data.test_dataloader())
        for r in batch
        if r["label"] == 1
    ]
    flags = np.concatenate([labels[np.array(r["instance_ids"], dtype=int)] for r in records])
    weights = np.concatenate([np.array(r["weights"]) * r["n_instances"] for r in records])
    print(
        "attention AUROC for witness instances (held-out positive bags): "
        f"{roc_auc_score(flags, weights):.3f}"
    )


if __name__ == "__main__":
    main()
