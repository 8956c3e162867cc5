"""Patient-level stratified splits (scikit-learn underneath)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split


def _check(ids: Sequence[str], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    ids_arr, labels_arr = np.asarray(ids), np.asarray(labels)
    if len(ids_arr) != len(labels_arr):
        raise ValueError(f"{len(ids_arr)} ids but {len(labels_arr)} labels")
    if len(set(ids_arr.tolist())) != len(ids_arr):
        raise ValueError("patient ids must be unique")
    if np.any((labels_arr != 0) & (labels_arr != 1)):
        raise ValueError("splits take labelled patients only (labels 0/1)")
    return ids_arr, labels_arr


def holdout_split(
    ids: Sequence[str], labels: Sequence[int], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Stratified ``(rest, held_out)`` with about ``fraction`` of the patients held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    ids_arr, labels_arr = _check(ids, labels)
    counts = np.bincount(labels_arr, minlength=2)
    n_held = int(np.ceil(fraction * len(ids_arr)))
    if counts.min() < 2 or not 2 <= n_held <= len(ids_arr) - 2:
        raise ValueError(
            f"cannot hold out {fraction} of {len(ids_arr)} labelled patients ({counts[0]} of "
            f"label 0, {counts[1]} of label 1) with both labels on both sides: a stratified "
            "split needs at least 2 patients of each label, and 2 on each side"
        )
    rest, held = train_test_split(
        ids_arr, test_size=fraction, stratify=labels_arr, random_state=seed
    )
    return sorted(rest.tolist()), sorted(held.tolist())


def kfold_split(
    ids: Sequence[str], labels: Sequence[int], n_folds: int, fold: int, seed: int
) -> tuple[list[str], list[str]]:
    """Stratified k-fold: ``(train, val)`` for fold ``fold`` of ``n_folds`` (shuffled by seed)."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds}), got {fold}")
    folds = stratified_folds(ids, labels, n_folds, seed)
    val = folds[fold]
    train = sorted(i for k, f in enumerate(folds) if k != fold for i in f)
    return train, val


def stratified_folds(
    ids: Sequence[str], labels: Sequence[int], n_folds: int, seed: int
) -> list[list[str]]:
    """The ``n_folds`` disjoint, stratified folds that cover every patient once."""
    ids_arr, labels_arr = _check(ids, labels)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    smallest = int(np.bincount(labels_arr, minlength=2).min())
    if smallest < n_folds:
        raise ValueError(f"n_folds={n_folds} but the smaller class has only {smallest} patient(s)")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [sorted(ids_arr[test].tolist()) for _, test in splitter.split(ids_arr, labels_arr)]
