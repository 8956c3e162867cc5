"""Load a trained checkpoint and predict new patients with the Python API.

    python examples/predict_api.py --ckpt runs/train_api/checkpoints/best.ckpt \
        --root runs/train_api/dlmi --size 32 [--model AttentionMIL] [--out predictions]

The checkpoint carries everything the model needs: weights, the clinical standardisation
fitted on its training patients and the decision threshold. The datamodule only has to read
the crops at the size the model was trained on. By default every unlabelled patient of
``--root`` is predicted; ``--patients P1 P2`` picks others.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import pandas as pd

import lympho_mil
from lympho_mil import PatientBagDataModule
from lympho_mil.data import CropSettings
from lympho_mil.evaluation import PredictionWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a .ckpt file")
    parser.add_argument("--root", type=Path, required=True, help="a DLMI folder")
    parser.add_argument("--size", type=int, required=True, help="crop side the model saw")
    parser.add_argument("--center-crop", type=int, help="centre crop the model saw, if any")
    parser.add_argument("--model", default="AttentionMIL", help="the checkpoint's class")
    parser.add_argument("--patients", nargs="+", help="ids to predict (default: unlabelled)")
    parser.add_argument("--out", type=Path, default=Path("predictions"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    model_class = getattr(lympho_mil, args.model)
    model = model_class.load_from_checkpoint(args.ckpt, map_location="cpu")
    print(f"{args.model}: decision threshold {float(model.threshold):.2f}")

    data = PatientBagDataModule(
        str(args.root),
        crops=CropSettings(
            image_size=args.size, center_crop=args.center_crop, cache_dir=str(args.out / "cache")
        ),
        predict_ids=args.patients,
    )
    writer = PredictionWriter(str(args.out), overwrite=args.overwrite, explain=True)
    trainer = L.Trainer(
        accelerator="auto", callbacks=[writer], logger=False, enable_progress_bar=False
    )
    trainer.predict(model, data, return_predictions=False)

    detail = pd.read_csv(args.out / "predictions_detail.csv", dtype={"id": str})
    print(detail[["id", "probability", "predicted"]].to_string(index=False))


if __name__ == "__main__":
    main()
