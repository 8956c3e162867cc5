"""Self-supervised pretraining of a crop encoder on the crops themselves (SimCLR or DINO,
lightly).

No weights can be downloaded where this library runs, so the crop encoder learns from the
crops alone, labels unused: two random views of every crop go through the encoder and a
projection head. With SimCLR, lightly's NT-Xent loss pulls the two views of a crop together
and pushes the other crops of the batch away; with DINO, a student network learns to give
each view the output of a teacher (a moving average of the student) on the other view, over
1,024 learnt prototypes, with lightly's loss, head and momentum update; the teacher's encoder
is the one kept. The views keep what a haematologist reads: any rotation
or mirror image, a shift of a few pixels, sizes within 10 % (cell size is a diagnostic sign,
so no random resized crop), the stains of another smear (`StainJitter`, ``stain_jitter``),
mild colour jitter (the blue of the cytoplasm is another sign) and a little blur. Batches mix
the crops of every patient; the encoder (`SmallCNN`) normalises with GroupNorm. With
``patient_pairs`` > 0, each positive pair is, with that probability, views of two different
crops of one patient instead of two views of one crop (patients, not labels: the unlabelled
patients' crops pair too), asking the encoder for what a patient's cells share.

The weights are cached: ``<cache_dir>/encoder-<key>.pt`` plus a JSON sidecar (settings, loss
per epoch, seconds), ``key`` hashing the settings, the pixel normalisation and the crops'
pixels (and their patients, with ``patient_pairs``); a second run with the same crops and
settings loads them. Needs the ``ssl`` extra (``pip install lympho-mil[ssl]``: lightly).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lympho_mil.arguments import SettingError, check_positive
from lympho_mil.data.dlmi_crops import DLMICrops
from lympho_mil.data.settings import CropSettings
from lympho_mil.files import atomic_write_bytes, atomic_write_text
from lympho_mil.nn.encoders import SmallCNN
from lympho_mil.progress import progress

log = logging.getLogger(__name__)

PRETRAIN_VERSION = 1  # bump when the method changes: cached encoders are then retrained
METHODS = ("simclr", "dino")
DINO_PROTOTYPES = 1024  # DINO's K, scaled down from its 65,536 to some 10,000 crops
DINO_TEACHER_TEMPERATURE = 0.04  # DINO's published defaults, these four
DINO_CENTER_MOMENTUM = 0.9
DINO_TEACHER_MOMENTUM = 0.996  # rises to 1 along a cosine over the training
DINO_CLIP_GRAD = 3.0
DINO_HEAD_BATCH_NORM = True  # DINO's option for CNNs; without it, a uniform collapse here


@dataclass(frozen=True)
class PretrainSettings:
    """Self-supervised pretraining (``method``: ``simclr`` or ``dino``) of a `SmallCNN`
    (``width``, ``out_dim``) on decoded crops.

    ``epochs`` passes over the crops in batches of ``batch_size`` (two views each), AdamW at
    ``lr`` (linear warm-up over the first ``warmup_epochs``, then cosine) with
    ``weight_decay``; ``seed`` fixes the weights, the order and the views. SimCLR: NT-Xent at
    ``temperature``, projection head ``out_dim`` -> ``hidden`` -> ``projection_dim``. DINO:
    ``temperature`` is the student's (DINO's 0.1), the head ``out_dim`` -> ``hidden`` ->
    ``hidden`` -> ``projection_dim`` (the bottleneck) -> `DINO_PROTOTYPES`; the teacher's
    temperature, centring, momentum and gradient clipping are DINO's published defaults
    (the ``DINO_*`` constants), its head has BatchNorm in its hidden layers (the batches mix
    the crops of every patient) and its last layer is frozen in the first epoch.
    ``patient_pairs``: the probability that a positive pair's second view is of another crop
    of the same patient (0: two views of one crop, the methods as published; a patient's only
    crop pairs with itself). With SimCLR, the batch's other crops stay negatives, a few of
    the same patient among them. ``stain_jitter``: the strength of `StainJitter` in every view
    (each stain's optical density scaled within ``1 ± stain_jitter``), 0.3 since the
    twenty-eighth round of docs/results.md found it a better encoder; 0: the views' colours
    as the seventh to twenty-seventh rounds drew them, jittered in RGB only.
    """

    epochs: int = 100
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_epochs: int = 5
    temperature: float = 0.2
    width: int = 32
    out_dim: int = 128
    hidden: int = 256
    projection_dim: int = 64
    seed: int = 0
    method: str = "simclr"
    patient_pairs: float = 0.0
    stain_jitter: float = 0.3

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SettingError(f"pretraining method must be one of {METHODS}, got {self.method!r}")
        check_positive(
            epochs=self.epochs,
            batch_size=self.batch_size,
            width=self.width,
            out_dim=self.out_dim,
            hidden=self.hidden,
            projection_dim=self.projection_dim,
        )
        if self.lr <= 0 or self.temperature <= 0 or self.weight_decay < 0:
            raise SettingError(
                f"pretraining needs lr > 0, temperature > 0 and weight_decay >= 0, got "
                f"{self.lr}, {self.temperature}, {self.weight_decay}"
            )
        if not 0 <= self.patient_pairs <= 1:
            raise SettingError(f"patient_pairs must be in [0, 1], got {self.patient_pairs}")
        if not 0 <= self.stain_jitter < 1:
            raise SettingError(f"stain_jitter must be in [0, 1), got {self.stain_jitter}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise SettingError(
                f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs} of {self.epochs}"
            )

    @property
    def encoder_kwargs(self) -> dict[str, int]:
        """The `SmallCNN` settings that load the pretrained weights."""
        return {"width": self.width, "out_dim": self.out_dim}

    def described(self) -> dict[str, Any]:
        """The settings as the cache key hashes them: without ``method`` for SimCLR and
        without ``patient_pairs`` or ``stain_jitter`` at 0, as before any of them existed, so
        that the encoders cached then stay valid."""
        fields = asdict(self)
        if self.method == "simclr":
            del fields["method"]
        for name in ("patient_pairs", "stain_jitter"):
            if fields[name] == 0:
                del fields[name]
        return fields


def _lightly() -> Any:
    """lightly (its losses, heads and utilities), or a one-line SettingError."""
    try:
        import lightly.loss
        import lightly.models.modules
        import lightly.models.utils
    except ImportError as exc:
        raise SettingError(
            "encoder pretraining needs lightly: pip install 'lympho-mil[ssl]'"
        ) from exc
    return lightly


class _SimCLR(nn.Module):
    """The encoder and its projection head; ``loss(x0, x1)`` is NT-Xent between two views."""

    def __init__(self, settings: PretrainSettings) -> None:
        super().__init__()
        lightly = _lightly()
        self.encoder = SmallCNN(**settings.encoder_kwargs)
        self.head = lightly.models.modules.SimCLRProjectionHead(
            settings.out_dim, settings.hidden, settings.projection_dim
        )
        self.criterion = lightly.loss.NTXentLoss(temperature=settings.temperature)

    def loss(self, x0: Tensor, x1: Tensor) -> Tensor:
        return self.criterion(self.head(self.encoder(x0)), self.head(self.encoder(x1)))

    def after_backward(self, epoch: int) -> None:
        """Nothing between the backward pass and the step (DINO clips and freezes there)."""

    def after_step(self, progress: float) -> None:
        """Nothing after an optimiser step (DINO moves its teacher there)."""

    def kept_encoder(self) -> SmallCNN:
        return self.encoder


class _DINO(nn.Module):
    """A student (encoder and DINO head, trained) and its teacher (a moving average of it,
    not trained); ``loss(x0, x1)``: lightly's DINO loss between the teacher's output on each
    view and the student's on the other."""

    def __init__(self, settings: PretrainSettings) -> None:
        super().__init__()
        lightly = _lightly()
        head = lightly.models.modules.DINOProjectionHead
        self.encoder = SmallCNN(**settings.encoder_kwargs)
        with warnings.catch_warnings():  # lightly's head still uses the old weight_norm
            warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm`", FutureWarning)
            self.head, self.teacher_head = (
                head(
                    settings.out_dim,
                    settings.hidden,
                    settings.projection_dim,
                    DINO_PROTOTYPES,
                    batch_norm=DINO_HEAD_BATCH_NORM,
                    freeze_last_layer=1,
                )
                for _ in range(2)
            )
        self.teacher_head.load_state_dict(self.head.state_dict())  # weight norm: no deepcopy
        self.teacher_encoder = copy.deepcopy(self.encoder)
        for teacher in (self.teacher_encoder, self.teacher_head):
            teacher.requires_grad_(False)
        self.criterion = lightly.loss.DINOLoss(
            DINO_PROTOTYPES,
            warmup_teacher_temp=DINO_TEACHER_TEMPERATURE,
            teacher_temp=DINO_TEACHER_TEMPERATURE,
            student_temp=settings.temperature,
            center_momentum=DINO_CENTER_MOMENTUM,
        )
        self._update_momentum = lightly.models.utils.update_momentum

    def loss(self, x0: Tensor, x1: Tensor) -> Tensor:
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_encoder(x)) for x in (x0, x1)]
        student = [self.head(self.encoder(x)) for x in (x0, x1)]
        return self.criterion(teacher, student)

    def after_backward(self, epoch: int) -> None:
        """Clip the student's gradients; freeze the head's last layer in the first epoch."""
        nn.utils.clip_grad_norm_(
            [*self.encoder.parameters(), *self.head.parameters()], DINO_CLIP_GRAD
        )
        self.head.cancel_last_layer_gradients(epoch)

    def after_step(self, progress: float) -> None:
        """Move the teacher towards the student, ``progress`` (0 to 1) through the training."""
        momentum = 1 - (1 - DINO_TEACHER_MOMENTUM) * (math.cos(math.pi * progress) + 1) / 2
        self._update_momentum(self.encoder, self.teacher_encoder, momentum)
        self._update_momentum(self.head, self.teacher_head, momentum)

    def kept_encoder(self) -> SmallCNN:
        return self.teacher_encoder


def pretraining_views(seed: int, stain_jitter: float) -> Any:
    """The albumentations pipeline that draws one view of a uint8 ``[S, S, 3]`` crop (with
    ``stain_jitter`` > 0, a `StainJitter` of that strength before the colour jitter)."""
    import cv2

    from lympho_mil.data.transforms import albumentations

    A = albumentations()
    stains = []
    if stain_jitter > 0:
        from lympho_mil.data.stain import StainJitter

        stains = [StainJitter(stain_jitter)]
    return A.Compose(
        [
            A.D4(),
            A.Affine(
                rotate=(-180, 180),
                scale=(0.9, 1.1),
                translate_percent=(-0.05, 0.05),
                border_mode=cv2.BORDER_REFLECT_101,
                p=1.0,
            ),
            *stains,
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8),
            A.GaussianBlur(blur_limit=(3, 5), p=0.2),
        ],
        seed=seed,
    )


class PatientPartners:
    """Draws, for crops, another crop of the same patient (``patients``: int ``[M]``, the
    patient of each crop; a crop alone in its patient is its own partner)."""

    def __init__(self, patients: np.ndarray, seed: int) -> None:
        patients = np.asarray(patients)
        self.members = np.argsort(patients, kind="stable")  # crops grouped by patient
        groups, starts, counts = np.unique(
            patients[self.members], return_index=True, return_counts=True
        )
        where = np.searchsorted(groups, patients)
        self.start, self.count = starts[where], counts[where]  # each crop's patient's span
        self.position = np.empty(len(patients), dtype=np.int64)
        self.position[self.members] = np.arange(len(patients)) - np.repeat(starts, counts)
        self.rng = np.random.default_rng([seed, 1])  # apart from the order's generator

    def __call__(self, rows: np.ndarray, share: float) -> np.ndarray:
        """``rows`` with each, with probability ``share``, replaced by another crop of its
        patient drawn uniformly."""
        draw = self.rng.integers(0, np.maximum(self.count[rows] - 1, 1))
        draw = draw + (draw >= self.position[rows])  # skip the crop itself
        other = self.members[self.start[rows] + np.minimum(draw, self.count[rows] - 1)]
        swap = (self.rng.random(len(rows)) < share) & (self.count[rows] > 1)
        return np.where(swap, other, rows)


def pretrain_encoder(
    crops: np.ndarray,
    settings: PretrainSettings,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "cpu",
    patients: np.ndarray | None = None,
) -> tuple[SmallCNN, list[float]]:
    """Pretrain a `SmallCNN` on ``crops`` (uint8 ``[M, S, S, 3]``, any order of patients) by
    ``settings.method`` (SimCLR or DINO); ``patients`` (int ``[M]``, each crop's patient) is
    needed when ``settings.patient_pairs`` > 0.

    Pixels in [0, 1] are normalised with ``mean``/``std`` as the loaders do. Returns the
    encoder (DINO: the teacher's; on the CPU, eval mode) and the mean loss of each epoch.
    """
    steps = len(crops) // settings.batch_size
    if steps == 0:
        raise SettingError(
            f"pretraining batch_size {settings.batch_size} exceeds the {len(crops)} crops"
        )
    partners = None
    if settings.patient_pairs > 0:
        patients = check_patients([crops], None if patients is None else [patients])[0]
        partners = PatientPartners(patients, settings.seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = _DINO(settings) if settings.method == "dino" else _SimCLR(settings)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(settings.warmup_epochs * steps, settings.epochs * steps)
    )
    views = pretraining_views(settings.seed, settings.stain_jitter)
    order_rng = np.random.default_rng(settings.seed)
    m = torch.tensor(list(mean), device=device).view(1, 3, 1, 1)
    s = torch.tensor(list(std), device=device).view(1, 3, 1, 1)

    def view_batch(rows: np.ndarray) -> Tensor:
        pixels = np.stack([views(image=crops[r])["image"] for r in rows])
        x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255
        return (x - m) / s

    history: list[float] = []
    title = f"pretraining the crop encoder ({settings.method.upper()})"
    with progress(title, settings.epochs, "epochs") as bar:
        for epoch in range(settings.epochs):
            order = order_rng.permutation(len(crops))
            total = 0.0
            for step in range(steps):
                rows = np.sort(order[step * settings.batch_size : (step + 1) * settings.batch_size])
                x0 = view_batch(rows)
                pair = rows if partners is None else partners(rows, settings.patient_pairs)
                loss = model.loss(x0, view_batch(pair))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                model.after_backward(epoch)
                optimizer.step()
                schedule.step()
                model.after_step((epoch * steps + step + 1) / (settings.epochs * steps))
                total += float(loss.detach())
            history.append(round(total / steps, 4))
            bar.note(f"loss {history[-1]:.3f}")
            bar.update()
    return model.kept_encoder().cpu().eval(), history


def _warmup_cosine(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def folder_crops(
    roots: Sequence[str | Path], crops: CropSettings
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The crops of every patient (labelled or not) of each DLMI folder in ``roots``, decoded
    and cached as ``crops`` says (uint8 ``[M_i, S, S, 3]``, one array a folder), the
    unreadable ones skipped with ``skip_bad_images`` left out, and the patient of each (int
    ``[M_i]``, numbered within its folder): what `pretrained_encoder` takes."""
    arrays, patients = [], []
    for root in roots:
        source = DLMICrops(str(root), crops, reference_date="2020-01-01")  # ages unused
        cache, bags = source.build_store(source.load_bags())
        owner = np.arange(-len(cache), 0)  # a crop of no patient is alone in its own
        for number, bag in enumerate(bags):
            owner[bag.rows] = number
        good = np.setdiff1d(np.arange(len(cache)), np.asarray(cache.bad, dtype=np.int64))
        arrays.append(cache[good])
        patients.append(owner[good])
    return arrays, patients


def pixels_digest(crops: np.ndarray) -> str:
    """Hash of the shape and bytes of an array: uint8 crops ``[M, S, S, 3]`` (or the int
    patients of crops, `crops_digests`)."""
    array = np.asarray(crops)
    digest = hashlib.sha256(f"{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:24]


def encoder_cache_file(
    digests: Sequence[str],
    settings: PretrainSettings,
    mean: Sequence[float],
    std: Sequence[float],
    cache_dir: Path,
) -> Path:
    """Where `pretrained_encoder` caches the weights of a pretraining with ``settings`` on
    crops of these `crops_digests` ``digests``, in any order (the file may not exist
    yet)."""
    described = [PRETRAIN_VERSION, settings.described(), list(mean), list(std), sorted(digests)]
    key = hashlib.sha256(json.dumps(described).encode()).hexdigest()[:24]
    return cache_dir / f"encoder-{key}.pt"


def crops_digests(
    crops: Sequence[np.ndarray],
    settings: PretrainSettings,
    patients: Sequence[np.ndarray] | None = None,
) -> list[str]:
    """The `pixels_digest` of each array of ``crops``, joined with the digest of its
    ``patients`` when ``settings.patient_pairs`` > 0 (the pairs then depend on them): the
    crops' part of `encoder_cache_file`'s key."""
    digests = [pixels_digest(c) for c in crops]
    if settings.patient_pairs == 0:
        return digests
    groups = check_patients(crops, patients)
    return [f"{d}+{pixels_digest(_first_seen(p))}" for d, p in zip(digests, groups, strict=True)]


def check_patients(
    crops: Sequence[np.ndarray], patients: Sequence[np.ndarray] | None
) -> Sequence[np.ndarray]:
    """``patients``, one array per array of ``crops`` and one patient per crop, or a
    SettingError (what ``patient_pairs`` needs)."""
    if patients is None or [len(p) for p in patients] != [len(c) for c in crops]:
        raise SettingError("patient_pairs needs the patient of every crop (patients=...)")
    return patients


def _first_seen(patients: np.ndarray) -> np.ndarray:
    """``patients`` renumbered 0, 1, ... in the order they first appear (int64): the grouping
    the pairs depend on, whatever the numbers were."""
    _, first, inverse = np.unique(np.asarray(patients), return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse.reshape(-1)].astype(np.int64)


def _numbered_apart(patients: Sequence[np.ndarray]) -> np.ndarray:
    """The patients of several folders as one int ``[M]`` array, no number shared by two
    folders."""
    numbered, offset = [], 0
    for folder in patients:
        ids = _first_seen(folder)
        numbered.append(ids + offset)
        offset += int(ids.max()) + 1 if len(ids) else 0
    return np.concatenate(numbered)


def pretrained_encoder(
    crops: Sequence[np.ndarray],
    settings: PretrainSettings,
    mean: Sequence[float],
    std: Sequence[float],
    cache_dir: Path,
    device: str | torch.device = "cpu",
    patients: Sequence[np.ndarray] | None = None,
) -> Path:
    """The weights file of a `SmallCNN` pretrained on every crop of ``crops`` (uint8
    ``[M_i, S, S, 3]`` arrays, e.g. the decoded crops of several folders; their order does not
    matter; ``patients``, each crop's patient, as `folder_crops` gives them, for
    ``settings.patient_pairs``): loaded from ``cache_dir`` when this pretraining ran before on
    the same pixels with the same settings, else trained now and cached. The key hashes the
    pixels themselves, so a new way of naming decoded-crop caches never retrains the
    encoder."""
    arrays = [np.asarray(c) for c in crops]
    digests = crops_digests(arrays, settings, patients)
    order = sorted(range(len(arrays)), key=digests.__getitem__)  # the pixels' order: fixed
    weights = encoder_cache_file(digests, settings, mean, std, cache_dir)
    sidecar = weights.with_suffix(".json")
    if weights.is_file() and sidecar.is_file():
        return weights
    pixels = np.concatenate([arrays[i] for i in order])
    owners = None if patients is None else _numbered_apart([patients[i] for i in order])
    log.debug("pretraining a crop encoder on %d crops (%s)", len(pixels), settings)
    start = time.perf_counter()
    encoder, history = pretrain_encoder(pixels, settings, mean, std, device, owners)
    seconds = round(time.perf_counter() - start, 1)
    buffer = _state_bytes(encoder)
    atomic_write_bytes(weights, buffer, overwrite=True)
    meta = {
        "version": PRETRAIN_VERSION,
        "settings": asdict(settings),
        "crops": len(pixels),
        "pixels": sorted(digests),
        "seconds": seconds,
        "loss": history,
    }
    atomic_write_text(sidecar, json.dumps(meta, indent=1), overwrite=True)
    return weights


def _state_bytes(module: nn.Module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buffer)
    return buffer.getvalue()
