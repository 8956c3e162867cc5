"""The clinical teacher of co-training (``teacher_confidence`` of
`lympho_mil.data.settings.SplitSettings`).

The crops and the clinical vector are two views of a patient. A teacher fitted on the clinical
view of the labelled training patients labels the unlabelled patients it is sure of; an image
model then trains on more patients than were labelled (Blum and Mitchell's co-training, one
round). scikit-learn's logistic regression is the teacher: a few parameters, well calibrated
on the 50 or so patients of a training split.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

UNSURE = -1
"""The label of a patient the teacher is not confident about (it stays unlabelled)."""


def clinical_teacher_labels(
    train: np.ndarray, labels: np.ndarray, pool: np.ndarray, confidence: float
) -> np.ndarray:
    """The teacher's labels of the ``pool`` patients.

    Args:
        train: clinical vectors of the labelled training patients, ``float[P, T]``.
        labels: their labels, ``int[P]`` (0/1, both present).
        pool: clinical vectors of the unlabelled patients, ``float[U, T]``.
        confidence: the probability of its class a pool patient needs (in [0.5, 1)).

    Returns:
        ``int[U]``: 1 where the teacher gives the patient at least ``confidence`` of being
        positive, 0 where at most ``1 - confidence``, `UNSURE` (-1) otherwise.
    """
    if len(pool) == 0:
        return np.zeros(0, dtype=np.int64)
    teacher = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
    teacher.fit(train, labels)
    positive = teacher.predict_proba(pool)[:, 1]
    sure = np.where(positive <= 1 - confidence, 0, UNSURE)
    return np.where(positive >= confidence, 1, sure).astype(np.int64)
