"""Train, test and predict with the Python API alone (no CLI), on synthetic patients.

    python examples/train_api.py                    # tiny: 24 patients, 32 px, 2 epochs
    python examples/train_api.py --patients 160 --size 64 --epochs 15 --model GatedFusionMIL

Writes a synthetic dataset in the DLMI layout, trains on the labelled patients with a
validation split that picks the best checkpoint, tests it on held-out patients, then predicts
the unlabelled ones: prediction files, a montage of the most and least attended crops per
patient and a summary page, all under ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lympho_mil import (
    AttentionMIL,
    GatedAttentionMIL,
    GatedFusionMIL,
    InstanceMIL,
    MeanPoolMIL,
    PatientBagDataModule,
    make_synthetic_dlmi,
)
from lympho_mil.data import CropSettings, LoaderSettings, SplitSettings
from lympho_mil.evaluation import PredictionWriter
from lympho_mil.nn import EncoderSettings

MODELS = {
    m.__name__: m
    for m in (AttentionMIL, GatedAttentionMIL, GatedFusionMIL, InstanceMIL, MeanPoolMIL)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/train_api"))
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--size", type=int, default=32, help="crop side in pixels")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", choices=sorted(MODELS), default="AttentionMIL")
    parser.add_argument("--width", type=int, default=8, help="width of the small CNN")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier predictions")
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)

    # 1. Data: a DLMI folder (here a synthetic one; point ``root`` at the challenge data).
    root = args.out / "dlmi"
    if not (root / "clinical_annotation.csv").is_file():
        make_synthetic_dlmi(root, n_patients=args.patients, image_size=args.size, max_cells=30)
    data = PatientBagDataModule(
        str(root),
        crops=CropSettings(image_size=args.size, cache_dir=str(args.out / "cache")),
        loader=LoaderSettings(batch_size=4),
        max_instances=16,
        split=SplitSettings(val_fraction=0.25, test_fraction=0.2),
    )

    # 2. Model: the clinical vector's size and its standardisation (fitted on the training
    #    patients only) come from the datamodule and travel inside the checkpoint.
    model = MODELS[args.model](
        encoder=EncoderSettings("small_cnn", out_dim=32, kwargs={"width": args.width}),
        tabular_dim=data.tabular_dim,
        tabular_stats=data.tabular_stats,
    )

    # 3. Train; keep the checkpoint with the best validation balanced accuracy.
    checkpoint = ModelCheckpoint(
        dirpath=args.out / "checkpoints",
        filename="best",
        monitor="val_balanced_accuracy",
        mode="max",
        enable_version_counter=False,
    )
    writer = PredictionWriter(
        str(args.out / "predictions"), overwrite=args.overwrite, explain=True, explain_top_k=6
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        callbacks=[checkpoint, writer],
        logger=CSVLogger(args.out / "logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)

    # 4. Test the best checkpoint on the held-out patients, then predict the unlabelled ones.
    (metrics,) = trainer.test(model, data, ckpt_path="best", verbose=False)
    print(f"best checkpoint: {checkpoint.best_model_path}")
    print(
        f"test balanced accuracy {metrics['test_balanced_accuracy']:.3f}, "
        f"AUROC {metrics['test_auroc']:.3f}"
    )
    trainer.predict(model, data, ckpt_path="best", return_predictions=False)
    print(f"summary page: {args.out / 'predictions' / 'explanations.md'}")


if __name__ == "__main__":
    main()
