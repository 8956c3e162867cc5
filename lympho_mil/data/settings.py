"""The grouped settings of the datamodules: which patients go where (`SplitSettings`), how the
loaders run (`LoaderSettings`), how a crop is decoded, cached and normalised (`CropSettings`)
and how training crops are augmented (`Augmentation`).

Each is a ``split:``, ``loader:``, ``crops:`` or ``augment:`` mapping in a config
(``--data.loader.batch_size 8`` on the command line), checked when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lympho_mil.arguments import SettingError, check_share
from lympho_mil.data.image_cache import CropSpec
from lympho_mil.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class SplitSettings:
    """Which patients train, validate and test.

    val_fraction: share of the labelled patients held out for validation (holdout policy);
        with ``test_fraction``, a share of those left after the test split.
    test_fraction: share held out first as a test split (0: none).
    n_folds, fold: k-fold policy instead of holdout: validate on fold ``fold``.
    train_ids, val_ids, test_ids: explicit patient lists (override the policy); used by
        cross-validation. ``val_ids: []`` trains without validation.
    teacher_confidence: co-training from the clinical vector (None: off). The unlabelled
        patients that a clinical teacher gives at least this probability of one class, in
        [0.5, 1), join the training split with that label
        (`lympho_mil.data.pseudo_labels.clinical_teacher_labels`: a logistic regression on
        the standardised clinical vector, balanced class weights, fitted on the training
        split's labelled patients only, never on validation or test patients). They count as
        training patients everywhere: the standardisations (and cell types) fitted on the
        training split are fitted on them too; no label enters those. They stay in the
        ``predict`` split: a model's answer for them is about a patient it trained on.
    """

    val_fraction: float = 0.2
    test_fraction: float = 0.0
    n_folds: int | None = None
    fold: int = 0
    train_ids: list[str] | None = None
    val_ids: list[str] | None = None
    test_ids: list[str] | None = None
    teacher_confidence: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise SettingError(
                f"val_fraction must be in (0, 1), got {self.val_fraction}; to train without "
                "validation, pass explicit train_ids and val_ids=[]"
            )
        if not 0.0 <= self.test_fraction < 1.0:
            raise SettingError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        n_folds, fold = self.n_folds, self.fold
        if n_folds is not None and not (n_folds >= 2 and 0 <= fold < n_folds):
            raise SettingError(f"need n_folds >= 2 and 0 <= fold < n_folds, got {n_folds}, {fold}")
        confidence = self.teacher_confidence
        if confidence is not None and not 0.5 <= confidence < 1.0:
            raise SettingError(f"teacher_confidence must be in [0.5, 1), got {confidence}")

    @property
    def explicit(self) -> dict[str, list[str] | None]:
        """The explicit id lists by split (None where not given)."""
        return {"train": self.train_ids, "val": self.val_ids, "test": self.test_ids}


@dataclass(frozen=True)
class LoaderSettings:
    """How the loaders run.

    batch_size: bags per batch; bags are padded to the largest one and masked.
    num_workers, pin_memory, persistent_workers: DataLoader settings (persistent workers
        only with workers).
    """

    batch_size: int = 4
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SettingError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise SettingError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class CropSettings:
    """How each crop is decoded once into the memory-mapped cache and normalised.

    image_size: side of the crops fed to the model, in pixels.
    center_crop: optional centre crop in source pixels before resizing (e.g. 112 keeps the
        lymphocyte and drops most red cells of a 224 px crop).
    mean, std: per-channel normalisation of pixels in [0, 1].
    cache_dir: where decoded crops are cached (default ``$LYMPHO_MIL_CACHE`` or
        ``~/.cache/lympho_mil``; never inside the data folder unless you point it there).
    skip_bad_images: skip unreadable images with a warning instead of failing.
    """

    image_size: int = 224
    center_crop: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    cache_dir: str | None = None
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SettingError(
                f"mean and std need 3 values, std > 0; got {self.mean} and {self.std}"
            )
        object.__setattr__(self, "mean", tuple(self.mean))  # a list from a config
        object.__setattr__(self, "std", tuple(self.std))

    @property
    def spec(self) -> CropSpec:
        """What the decoded-crop cache is keyed by."""
        return CropSpec(self.image_size, self.center_crop)


@dataclass(frozen=True)
class Augmentation:
    """Train-time augmentation: flips, 90-degree rotations, affine, colour.

    mode: "cpu": `lympho_mil.data.transforms.BagAugment` on each bag in the loader (OpenCV,
        random per crop, no hue). "gpu": the loader only slices uint8 crops (shipped channels
        last); the torch pipeline of `lympho_mil.data.gpu_augment` (no hue) augments whole
        batches after their transfer to the training device (``on_after_batch_transfer``).
        "none": no augmentation.
    affine, color_jitter: probabilities of those augmentation steps.
    cache_on_device: with ``mode="gpu"``, copy the decoded crops to the training device once
        (``image_size**2 * 3`` bytes per crop: 1 GB for 6,761 crops at 224 px); the training
        loader then ships row numbers only and the device gathers the pixels, so no crop
        crosses the host or the PCIe bus during training. Drawing row numbers takes
        microseconds: ``num_workers=0`` then beats worker processes.
    """

    mode: Literal["cpu", "gpu", "none"] = "cpu"
    affine: float = 0.5
    color_jitter: float = 0.5
    cache_on_device: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("cpu", "gpu", "none"):
            raise SettingError(f"augment mode must be 'cpu', 'gpu' or 'none', got {self.mode!r}")
        if self.cache_on_device and self.mode != "gpu":
            raise SettingError(
                "cache_on_device=True needs augment mode 'gpu' (the device augments)"
            )
        check_share("affine", self.affine)
        check_share("color_jitter", self.color_jitter)
