"""Does attention point at the abnormal cells? Instance-level AUROC on synthetic patients.

    python benchmarks/attention_auroc.py [--patients 160] [--size 64] [--epochs 20]
                                         [--model attention|gated] [--out DIR] [--explain DIR]

Writes a synthetic DLMI dataset (whose ``ground_truth.csv`` flags every abnormal crop), trains
an attention model on the labelled patients with the Python API, predicts the held-out test
patients (never seen in training) and scores each crop's attention weight against its
abnormal flag (``--explain DIR`` also writes their montages and summary page). Prints one
JSON line:

- ``auroc_within_tumoral``: mean over held-out tumoral patients of the AUROC inside each bag
  (attention is normalised per bag, so this is the comparison it is built for);
- ``auroc_tumoral_pooled``: all crops of held-out tumoral patients pooled, the weight scaled
  by the bag size (``n * a``, 1 = uniform) so bags of different sizes compare;
- ``auroc_all_pooled``: the same over every held-out crop, reactive patients included;
- the patient-level AUROC and balanced accuracy of the held-out patients, for context;
- ``untrained``: the same figures for the model at its initial weights, the baseline (a
  random network's attention is not uniform, and can already favour the abnormal cells).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
from mil_common import machine, quiet
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from speed_common import quiet_trainer

from lympho_mil import AttentionMIL, GatedAttentionMIL, PatientBagDataModule, make_synthetic_dlmi
from lympho_mil.evaluation.explain import write_explanations

MODELS = {"attention": AttentionMIL, "gated": GatedAttentionMIL}


def train_and_predict(
    args: argparse.Namespace, root: Path
) -> tuple[list[dict], list[dict], PatientBagDataModule]:
    """Fit on the labelled patients (fixed epochs); predict records of the test patients by
    the trained model and by the same model at its initial weights (the baseline)."""
    L.seed_everything(args.seed, workers=True, verbose=False)
    data = PatientBagDataModule(
        str(root),
        image_size=args.size,
        cache_dir=str(root.parent / "cache"),
        batch_size=8,
        max_instances=args.max_instances,
        val_fraction=0.2,
        seed=args.seed,
    )
    model = MODELS[args.model](
        encoder_kwargs={"width": args.width},
        embed_dim=args.embed_dim,
        attention_hidden=args.embed_dim,
        lr=args.lr,
        pos_weight=0.55,  # the synthetic cohort is ~65 % tumoral
        tabular_dim=data.tabular_dim,
        tabular_stats=data.tabular_stats,
    )
    initial = copy.deepcopy(model.state_dict())
    trainer = quiet_trainer(
        max_epochs=args.epochs,
    )
    trainer.fit(model, data)
    trained = [r for batch in trainer.predict(model, data) for r in batch]
    model.load_state_dict(initial)
    untrained = [r for batch in quiet_trainer().predict(model, data) for r in batch]
    return trained, untrained, data


def attention_scores(records: list[dict], truth: pd.DataFrame) -> dict[str, float]:
    """The instance-level AUROCs (see the module docstring) and patient-level figures."""
    crops = pd.DataFrame(
        [
            (r["id"], name, w * r["n_instances"])
            for r in records
            for name, w in zip(r["instance_ids"], r["weights"], strict=True)
        ],
        columns=["ID", "file", "relative_weight"],
    ).merge(truth, on=["ID", "file"], validate="one_to_one")
    tumoral = crops[crops["label"] == 1]
    per_patient = [
        roc_auc_score(bag["abnormal"], bag["relative_weight"])
        for _, bag in tumoral.groupby("ID")
        if bag["abnormal"].nunique() == 2
    ]
    patients = crops.groupby("ID")["label"].first()
    prob = pd.Series({r["id"]: r["probability"] for r in records})[patients.index]
    threshold = records[0]["threshold"]
    return {
        "auroc_within_tumoral": float(np.mean(per_patient)),
        "auroc_within_tumoral_min": float(np.min(per_patient)),
        "tumoral_patients": len(per_patient),
        "auroc_tumoral_pooled": roc_auc_score(tumoral["abnormal"], tumoral["relative_weight"]),
        "auroc_all_pooled": roc_auc_score(crops["abnormal"], crops["relative_weight"]),
        "crops": len(crops),
        "patient_auroc": roc_auc_score(patients, prob),
        "patient_balanced_accuracy": balanced_accuracy_score(patients, prob >= threshold),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=160)
    parser.add_argument("--size", type=int, default=64, help="crop side, pixels")
    parser.add_argument("--max-cells", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--model", choices=sorted(MODELS), default="attention")
    parser.add_argument("--width", type=int, default=16, help="small_cnn width")
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--max-instances", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--explain", type=Path, help="write montages of the test patients here")
    args = parser.parse_args()
    quiet(args.threads)
    where = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        root = work / f"synthetic-n{args.patients}-px{args.size}-seed{args.seed}"
        if not (root / "ground_truth.csv").is_file():
            make_synthetic_dlmi(
                root,
                args.patients,
                args.size,
                args.seed,
                min_cells=min(16, args.max_cells),
                max_cells=args.max_cells,
            )
        start = time.perf_counter()
        records, untrained, data = train_and_predict(args, root)
        seconds = time.perf_counter() - start
        if args.explain:
            name = MODELS[args.model].__name__
            write_explanations(records, data.instance_paths, args.explain, 8, True, name)
        truth = pd.read_csv(root / "ground_truth.csv", dtype={"ID": str})
        result = {"benchmark": "attention_auroc", "model": args.model}
        result |= attention_scores(records, truth)
        result["untrained"] = attention_scores(untrained, truth)  # what training adds to
        result |= {"epochs": args.epochs, "size": args.size, "patients": args.patients}
        result |= {"fit_predict_seconds": round(seconds, 1), "machine": where}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
