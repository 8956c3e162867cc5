"""Embeddings of every crop by a frozen encoder, computed once and memory-mapped.

Heads (attention MIL, mean pooling, ...) then train on ``float[B, N, D]`` features in seconds,
which is what makes repeated cross-validation affordable. The cache file is
``<cache_dir>/features-<key>.npy`` (``float16`` or ``float32[M, V, D]``: every crop, ``V = 1``
or its 8 dihedral views) plus a JSON sidecar with a checksum, like the decoded-crop cache it
is computed from (`lympho_mil.data.image_cache`). ``key`` hashes the encoder's name and
settings, a digest of its weights, the crop spec, the normalisation, the views, the storage
dtype and the key of the decoded crops: any change gives a new key and a new extraction.

Features are label-free and computed for every crop, so one extraction serves every fold of
a cross-validation without leakage: each fold's datamodule finds the cache on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lympho_mil.arguments import SettingError, as_settings, check_not_none_text
from lympho_mil.data.clinical import FEATURE_NAMES
from lympho_mil.data.datamodule import BagDataModule
from lympho_mil.data.dataset import Bag, InstanceStore, InstanceTransform
from lympho_mil.data.dlmi_crops import DLMICrops
from lympho_mil.data.errors import DataError
from lympho_mil.data.gpu_augment import normalize_pixels
from lympho_mil.data.image_cache import (
    CropSpec,
    ImageCache,
    MemmapRows,
    default_cache_dir,
    load_or_build,
    write_cache,
)
from lympho_mil.data.scaled import ScaledFeatures
from lympho_mil.data.settings import CropSettings
from lympho_mil.data.transforms import CellTypes, FeatureScaling, FeaturesToTensor
from lympho_mil.dihedral import DIHEDRAL_VIEWS, stack_dihedral_views
from lympho_mil.features.cytometry import CytometryEncoder
from lympho_mil.files import file_digest
from lympho_mil.nn.encoders import build_instance_encoder, encoder_out_dim
from lympho_mil.progress import progress

log = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1
EvalView = Literal["mean", "identity"]


def weights_digest(module: nn.Module) -> str:
    """Hash of every state_dict entry of ``module``: name, dtype, shape and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class FeatureSpec:
    """How cached crops become cached features, apart from the encoder's weights.

    ``encoder`` names the extractor (with its ``encoder_kwargs``); ``crop`` is the spec of
    the decoded crops; ``mean``/``std`` normalise pixels in [0, 1] before the encoder;
    ``dihedral`` also stores the 8 flip/rotation views of every crop; ``dtype`` is the
    storage type of the features.
    """

    encoder: str
    crop: CropSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    encoder_kwargs: tuple[tuple[str, Any], ...] = ()
    dihedral: bool = False
    dtype: Literal["float16", "float32"] = "float16"

    @property
    def views(self) -> int:
        """V: stored views per crop."""
        return DIHEDRAL_VIEWS if self.dihedral else 1


def feature_cache_key(spec: FeatureSpec, weights: str, images_key: str) -> str:
    """Hash of the spec, the encoder's weights digest and the decoded crops' cache key."""
    described = [FEATURE_CACHE_VERSION, asdict(spec), weights, images_key]
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()[:24]


def extract_features(
    images: InstanceStore,
    n_crops: int,
    encoder: nn.Module,
    spec: FeatureSpec,
    out: np.ndarray,
    device: torch.device,
    batch_size: int = 256,
) -> None:
    """Fill ``out[M, V, D]`` with ``encoder``'s embeddings of the ``M = n_crops`` cached crops
    (and of their dihedral views), ``batch_size`` encoder inputs at a time, in eval mode under
    ``torch.inference_mode`` on ``device`` (the encoder is moved there). Pixels travel as
    uint8 and are normalised there exactly as the image loaders do."""
    rows_per_step = max(1, batch_size // spec.views)
    encoder.eval().to(device)
    with torch.inference_mode(), progress(f"extracting {spec.encoder} features", n_crops) as bar:
        for start in range(0, n_crops, rows_per_step):
            rows = np.arange(start, min(start + rows_per_step, n_crops))
            pixels = torch.from_numpy(images[rows]).to(device).permute(0, 3, 1, 2)
            x = normalize_pixels(pixels, spec.mean, spec.std)
            if spec.dihedral:
                x = stack_dihedral_views(x).flatten(0, 1)
            h = encoder(x).reshape(len(rows), spec.views, -1)
            out[rows] = h.float().cpu().numpy()
            bar.update(len(rows))


class FeatureCache(MemmapRows):
    """``float16/32[M, V, D]`` crop embeddings, memory-mapped; picklable.

    ``rows`` of the decoded-crop cache and of this one are the same crops.
    """

    @property
    def views(self) -> int:
        """V: stored views per crop."""
        return int(self.array.shape[1])

    @property
    def dim(self) -> int:
        """D: size of a crop's feature vector."""
        return int(self.array.shape[2])

    @classmethod
    def build_or_load(
        cls,
        images: ImageCache,
        encoder: nn.Module,
        spec: FeatureSpec,
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
    ) -> FeatureCache:
        """Load the features of ``images`` by ``encoder`` if cached and intact, else extract
        them on ``device``, ``batch_size`` encoder inputs at a time, into ``cache_dir``
        (default ``$LYMPHO_MIL_CACHE`` or ``~/.cache/lympho_mil``)."""
        cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        weights = weights_digest(encoder)
        key = feature_cache_key(spec, weights, images.path.stem)
        data_path = cache_dir / f"features-{key}.npy"
        meta_path = cache_dir / f"features-{key}.json"
        shape = (len(images), spec.views, encoder_out_dim(encoder))

        def fill(array: np.ndarray) -> dict[str, Any]:
            log.debug(
                "extracting %s features of %d crops into %s", spec.encoder, shape[0], data_path
            )
            start = time.perf_counter()
            extract_features(
                images, shape[0], encoder, spec, array, torch.device(device), batch_size
            )
            return {"seconds": round(time.perf_counter() - start, 3)}

        description = {**asdict(spec), "weights": weights, "images": images.path.stem}
        meta = {"version": FEATURE_CACHE_VERSION, "key": key, **description}
        load_or_build(
            data_path,
            meta_path,
            FEATURE_CACHE_VERSION,
            "feature cache",
            lambda: write_cache(data_path, meta_path, shape, spec.dtype, fill, meta),
        )
        return cls(data_path)


class SelectView:
    """Cached ``[n, V, D]`` features -> float32 ``[n, D]``: one random view per crop
    (``"random"``, training), the mean over views, or view 0 (the crop as it is); then the
    optional ``scaling`` and ``cell_types`` (``[n, K]`` one-hot; with ``keep_features``,
    ``[n, D + K]``: the features followed by the one-hot type)."""

    def __init__(
        self,
        mode: Literal["random", "mean", "identity"],
        to_tensor: FeaturesToTensor,
        scaling: FeatureScaling | None = None,
        cell_types: CellTypes | None = None,
        keep_features: bool = False,
    ) -> None:
        if mode not in ("random", "mean", "identity"):
            raise SettingError(f"mode must be 'random', 'mean' or 'identity', got {mode!r}")
        self.mode = mode
        self.to_tensor = to_tensor
        self.scaling = scaling
        self.cell_types = cell_types
        self.keep_features = keep_features

    def __call__(self, features: np.ndarray, rng: np.random.Generator) -> Tensor:
        if self.mode == "random":
            views = rng.integers(features.shape[1], size=len(features))
            picked = features[np.arange(len(features)), views]
        elif self.mode == "mean":
            picked = features.astype(np.float32).mean(axis=1)
        else:
            picked = features[:, 0]
        if self.scaling is not None:
            picked = self.scaling(picked.astype(np.float32))
        if self.cell_types is not None:
            picked = picked.astype(np.float32)
            types = self.cell_types(picked)
            picked = np.concatenate([picked, types], axis=1) if self.keep_features else types
        return self.to_tensor(picked, rng)


@dataclass(frozen=True)
class FeatureSource:
    """The frozen encoder that turns every crop into a feature vector, and how it runs
    (``features:`` of `CachedFeatureDataModule`'s config).

    encoder: the extractor: ``cytometry`` (scikit-image cytomorphometry,
        `lympho_mil.features.cytometry`) or any `lympho_mil.nn.build_instance_encoder` name
        (``morphology``, ``small_cnn``, a timm model such as ``resnet18``, ...).
    weights: local weights file of the extractor (a state dict of the timm backbone, or of
        the built-in encoder module). Without it the encoder keeps its initial weights drawn
        under ``seed``: reproducible, but only a plumbing demonstration.
    kwargs: extra constructor arguments (e.g. ``{"out_dim": 64}``).
    seed: seed of the initial weights (and of the k-means of the cell types).
    dihedral: also embed the 8 flip/90-degree rotation views of every crop; training then
        draws one view per crop per step (the augmentation of a frozen encoder).
    eval_view: with ``dihedral``, what validation, test and predict see: ``"mean"`` of the 8
        views or the ``"identity"`` view.
    dtype: storage type of the cache.
    extract_batch_size: encoder inputs per forward during extraction.
    extract_device: where to extract (None: the Trainer's device when the datamodule is
        attached to one, else the CPU).
    """

    encoder: str = "small_cnn"
    weights: str | None = None
    kwargs: dict[str, Any] | None = None
    seed: int = 0
    dihedral: bool = False
    eval_view: EvalView = "mean"
    dtype: Literal["float16", "float32"] = "float16"
    extract_batch_size: int = 256
    extract_device: str | None = None

    def __post_init__(self) -> None:
        check_not_none_text(
            "data.features", weights=self.weights, extract_device=self.extract_device
        )
        if self.eval_view not in ("mean", "identity"):
            raise SettingError(f"eval_view must be 'mean' or 'identity', got {self.eval_view!r}")

    def weights_file(self) -> Path | None:
        """The ``weights`` file, or None without one; FileNotFoundError saying how to make
        it when it is missing."""
        if self.weights is None:
            return None
        if not Path(self.weights).is_file():
            raise FileNotFoundError(
                f"features.weights: no file {self.weights}. Nothing is downloaded: make it once "
                "with `lympho-mil pretrain --config CONFIG --data.root PATH` (self-supervised, "
                "on the crops themselves), or point features.weights at a local weights file"
            )
        return Path(self.weights)

    def build(self, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
        """The frozen encoder, its initial weights drawn under ``seed``. The morphology and
        cytometry encoders un-normalise with the loaders' ``mean``/``std`` (unless
        ``kwargs`` say otherwise)."""
        weights = self.weights_file()
        kwargs = dict(self.kwargs or {})
        if self.encoder in ("morphology", "cytometry"):
            kwargs = {"mean": mean, "std": std, **kwargs}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.encoder == "cytometry":
                module: nn.Module = CytometryEncoder(**kwargs)
            else:
                path = None if weights is None else str(weights)
                module = build_instance_encoder(self.encoder, weights_path=path, **kwargs)
        return module.requires_grad_(False).eval()


@dataclass(frozen=True)
class CellTypeSettings:
    """Each crop's cell type (``cell_types:`` of `CachedFeatureDataModule`; a bare count
    ``K`` stands for ``{count: K}``).

    count: K, the number of cell types: the nearest of K k-means centres of the training
        patients' standardised crop features, one-hot (`lympho_mil.data.transforms.CellTypes`;
        0: no cell types).
    keep_features: each crop is its standardised features followed by its one-hot type
        (``D + K`` values: what `lympho_mil.models.LogitSumMIL`'s experts read) instead of
        its type alone (``K``). ``noise_std`` reaches all of them in training, as it does the
        one-hot types alone.
    """

    count: int = 0
    keep_features: bool = False

    def __post_init__(self) -> None:
        if self.count < 0:
            raise SettingError(f"cell_types must be 0 or a positive count, got {self.count}")
        if self.keep_features and not self.count:
            raise SettingError("cell_types.keep_features needs a positive cell_types.count")

    @classmethod
    def of(cls, value: int | CellTypeSettings | dict[str, Any]) -> CellTypeSettings:
        """``value`` as settings: a bare count, a mapping of the fields, or the settings."""
        if isinstance(value, bool):
            raise SettingError(f"cell_types must be a count or a mapping, got {value}")
        if isinstance(value, int):
            return cls(count=value)
        return as_settings(cls, value)

    def record(self) -> int | dict[str, Any]:
        """What a checkpoint records: the bare count unless ``keep_features``."""
        return asdict(self) if self.keep_features else self.count


class CachedFeatureDataModule(ScaledFeatures, BagDataModule):
    """DLMI patients as bags of frozen-encoder features ``float[n, D]``, extracted once.

    Crops are decoded into the image cache as for `PatientBagDataModule` (the same
    `lympho_mil.data.dlmi_crops.DLMICrops`), then every crop is embedded once by the
    encoder of ``features`` and the features are cached (`lympho_mil.features.cache`).
    Models read them with the ``identity`` (or ``mlp``) encoder and ``in_dim`` equal to
    `feature_dim`; a model refuses features of another size at its first batch, both sizes
    named.

    Args:
        root: the DLMI folder.
        crops: how each crop is decoded, cached and normalised before the encoder
            (`lympho_mil.data.settings.CropSettings`).
        reference_date: date at which ages are computed (ISO format).
        features: the encoder and how it runs (`FeatureSource`).
        standardize: clip every feature to the range of the training patients' crops and
            z-score it with their mean and standard deviation (for features on unequal
            scales, such as the ``morphology`` encoder's); fitted per split, like the clinical
            standardisation, on the mean over views, and saved in checkpoints.
        cell_types: K, or `CellTypeSettings`: with K > 0, each crop becomes its cell type:
            the nearest of K k-means centres of the training patients' standardised crop
            features, one-hot (`lympho_mil.data.transforms.CellTypes`; needs
            ``standardize``); mean pooling then gives each patient's share of every type.
            Fitted per split, saved in checkpoints; `feature_dim` is then K (``D + K`` with
            ``keep_features``).
        noise_std: Gaussian noise added to training features (after standardisation).
        **kwargs: split, prediction and loader settings of `BagDataModule`.
    """

    feature_names = FEATURE_NAMES

    def __init__(
        self,
        root: str,
        crops: CropSettings = CropSettings(),
        reference_date: str = "2020-01-01",
        features: FeatureSource = FeatureSource(),
        standardize: bool = False,
        cell_types: int | CellTypeSettings = 0,
        noise_std: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source = DLMICrops(root, as_settings(CropSettings, crops), reference_date)
        self.features = as_settings(FeatureSource, features)
        self.cell_type_settings = CellTypeSettings.of(cell_types)
        if self.cell_type_settings.count and not standardize:
            raise SettingError(
                f"cell_types needs standardize: true (cell_types: "
                f"{self.cell_type_settings.count}, standardize: {standardize})"
            )
        self.standardize = standardize
        self.scaling: FeatureScaling | None = None
        self.cell_types: CellTypes | None = None
        self.noise_std = noise_std
        source = self.source.crops
        self.feature_spec = FeatureSpec(
            self.features.encoder,
            source.spec,
            source.mean,
            source.std,
            tuple(sorted((self.features.kwargs or {}).items())),
            self.features.dihedral,
            self.features.dtype,
        )

    def input_settings(self) -> dict[str, Any]:
        features = self.features
        weights = features.weights_file()
        return {
            **super().input_settings(),
            **self.source.input_settings(),
            "instances": "features",
            "encoder": features.encoder,
            "encoder_kwargs": dict(features.kwargs or {}),
            "encoder_weights": None if weights is None else file_digest(weights),
            "encoder_seed": None if weights is not None else features.seed,
            "dihedral": features.dihedral,
            "eval_view": features.eval_view,
            "standardize": self.standardize,
            "cell_types": self.cell_type_settings.record(),
        }

    def load_bags(self) -> list[Bag]:
        return self.source.load_bags()

    def instance_paths(self, bag_id: str) -> list[Path]:
        """Files of patient ``bag_id``'s crops, in the order of its ``instance_ids``."""
        return [self.source.paths[row] for row in self.bags[bag_id].rows]

    @cached_property
    def extractor(self) -> nn.Module:
        """The frozen encoder of ``features`` (`FeatureSource.build`)."""
        return self.features.build(self.source.crops.mean, self.source.crops.std)

    @property
    def n_cell_types(self) -> int:
        """K, the number of cell types (0: none)."""
        return self.cell_type_settings.count

    @property
    def feature_dim(self) -> int:
        """D, the size of a crop's feature vector (the model's ``in_dim``): the encoder's,
        the number of cell types, or their sum (``cell_types.keep_features``)."""
        if self.cell_type_settings.keep_features:
            return encoder_out_dim(self.extractor) + self.n_cell_types
        return self.n_cell_types or encoder_out_dim(self.extractor)

    def build_store(self, bags: Sequence[Bag]) -> tuple[InstanceStore, list[Bag]]:
        images, usable = self.source.build_store(bags)
        store = FeatureCache.build_or_load(
            images,
            self.extractor,
            self.feature_spec,
            self.source.crops.cache_dir,
            self._device(),
            self.features.extract_batch_size,
        )
        self.extractor.cpu()  # give back the accelerator's memory after an extraction
        if self.standardize and self.scaling is None:
            self.scaling = self._fit_scaling(store, usable)
        if self.n_cell_types and self.cell_types is None and self.scaling is not None:
            self.cell_types = self._fit_cell_types(store, usable, self.scaling)
        return store, usable

    def _fit_scaling(self, store: FeatureCache, usable: Sequence[Bag]) -> FeatureScaling | None:
        """The standardisation of the training patients' readable crops (None without
        training patients: a checkpoint's is loaded later, see `load_state_dict`)."""
        by_id = {b.bag_id: b for b in usable}
        train = [by_id[i].rows for i in self.training_patients() if i in by_id]
        if not train:
            log.warning(
                "no training patients to fit the feature standardisation on: predict with a "
                "checkpoint (ckpt_path), which carries the one it was trained with"
            )
            return None
        rows = np.sort(np.concatenate(train))
        return FeatureScaling.fit(store[rows].astype(np.float32).mean(axis=1))

    def _fit_cell_types(
        self, store: FeatureCache, usable: Sequence[Bag], scaling: FeatureScaling
    ) -> CellTypes | None:
        """The cell types of the training patients' readable crops (None without training
        patients, as for the standardisation)."""
        by_id = {b.bag_id: b for b in usable}
        train = [by_id[i].rows for i in self.training_patients() if i in by_id]
        if not train:
            return None
        rows = np.sort(np.concatenate(train))
        features = scaling(store[rows].astype(np.float32).mean(axis=1))
        return CellTypes.fit(features, self.n_cell_types, seed=self.features.seed)

    def scaled_size(self) -> int:
        return encoder_out_dim(self.extractor)

    def use_scaling(self, scaling: FeatureScaling) -> None:
        for dataset in self.datasets.values():
            if isinstance(dataset.to_tensor, SelectView):
                dataset.to_tensor.scaling = scaling

    def state_dict(self) -> dict[str, Any]:
        """The feature standardisation and the cell types, saved in checkpoints."""
        state = super().state_dict()
        if self.cell_types is not None:
            state["cell_types"] = self.cell_types.to_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint's standardisation and cell types, also in the datasets
        already set up; `DataError` when they do not fit these features."""
        super().load_state_dict(state_dict)
        saved = state_dict.get("cell_types")
        if saved is None:
            return
        types = CellTypes.from_state(saved)
        wanted = (self.n_cell_types, self.scaled_size())
        if types.centres.shape != wanted:
            raise DataError(
                f"the checkpoint has {types.centres.shape[0]} cell types of "
                f"{types.centres.shape[1]} features but the data settings give {wanted[0]} of "
                f"{wanted[1]}: use the data settings the model was trained with"
            )
        self.cell_types = types
        for dataset in self.datasets.values():
            if isinstance(dataset.to_tensor, SelectView):
                dataset.to_tensor.cell_types = types

    def _device(self) -> torch.device:
        if self.features.extract_device is not None:
            return torch.device(self.features.extract_device)
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def instance_transform(self, stage: str) -> InstanceTransform:
        to_tensor = FeaturesToTensor(self.noise_std if stage == "train" else 0.0)
        keep = self.cell_type_settings.keep_features
        view: Literal["random", "mean", "identity"] = (
            "random" if stage == "train" else self.features.eval_view
        )
        return SelectView(view, to_tensor, self.scaling, self.cell_types, keep)
