"""Instance encoders: modules mapping a flat batch of instances ``x[M, ...]`` to ``[M, out_dim]``.

Each encoder exposes ``out_dim``. `ENCODERS` names the built-in ones (any other name is a timm
model); `EncoderSettings` describes one as models take it and `build_encoder` builds it;
``encode_instances`` applies one to the real instances of padded bags ``[B, N, ...]``.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, SupportsInt, cast

import torch
from torch import Tensor, nn

from lympho_mil.arguments import SettingError, check_not_none_text, check_positive
from lympho_mil.nn.acceleration import use_channels_last
from lympho_mil.nn.morphology import MorphologyEncoder


class EncoderWeightsError(RuntimeError):
    """A local encoder weights file (``weights_path``, ``encoder_weights``) does not fit the
    encoder built from the settings; the message names the file."""


class SmallCNN(nn.Module):
    """Fast CPU CNN: 4 stride-2 conv stages (GroupNorm, GELU), global average pool, Linear.

    ``x[M, in_chans, H, W]`` (any size: the pooling is global) -> ``[M, out_dim]``; the stages
    have ``width``, 2, 4 and 8 times ``width`` channels. GroupNorm, not BatchNorm: batch
    statistics over the crops of one patient would be per-patient statistics.
    """

    def __init__(self, in_chans: int = 3, width: int = 32, out_dim: int = 128) -> None:
        super().__init__()
        chans = [in_chans, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in pairwise(chans):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.GroupNorm(math.gcd(8, c_out), c_out),
                nn.GELU(),
            ]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(chans[-1], out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """``x[M, C, H, W]`` -> ``[M, out_dim]``."""
        return self.head(self.features(x))


class LeNetEncoder(nn.Module):
    """LeNet-like encoder of Ilse et al. (2018) for ``x[M, 1, 28, 28]`` -> ``[M, out_dim]``."""

    def __init__(self, out_dim: int = 500) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 20, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(50 * 4 * 4, out_dim),
            nn.ReLU(),
        )
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """``x[M, 1, 28, 28]`` -> ``[M, out_dim]``."""
        return self.net(x)


class MLPEncoder(nn.Module):
    """Linear-GELU-Dropout-Linear-GELU: ``x[M, in_dim]`` -> ``[M, out_dim]``; the encoder
    ``mlp`` of precomputed crop features, and the clinical encoder of `TabularNet` and
    `GatedFusionNet`."""

    def __init__(
        self, in_dim: int, hidden: int = 256, out_dim: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
            nn.GELU(),
        )
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """``x[M, in_dim]`` -> ``[M, out_dim]``."""
        return self.net(x)


class IdentityEncoder(nn.Module):
    """Passes precomputed features ``x[M, in_dim]`` through unchanged."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = in_dim

    def forward(self, x: Tensor) -> Tensor:
        """``x[M, in_dim]`` -> ``x``."""
        return x


class FeatureColumns(nn.Module):
    """Columns ``start:stop`` of precomputed features: ``x[M, D]`` -> ``x[M, stop - start]``
    (an expert that reads one part of each crop's vector, e.g. its one-hot cell type)."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        if not 0 <= start < stop:
            raise ValueError(f"need 0 <= start < stop, got columns {start}:{stop}")
        self.start, self.stop = start, stop
        self.out_dim = stop - start

    def forward(self, x: Tensor) -> Tensor:
        """``x[M, D]`` (D >= stop) -> ``x[:, start:stop]``."""
        return x[:, self.start : self.stop]


class TimmEncoder(nn.Module):
    """Any timm model without its classifier: ``x[M, in_chans, H, W]`` -> ``[M, num_features]``.

    ``model_kwargs`` go to ``timm.create_model`` as they are (``img_size=112`` for a ViT at the
    crop size, ``in_chans``, ``drop_path_rate``, ...); one it does not take is a
    SettingError naming it. Nothing is downloaded: pretrained weights come from a local file
    ``weights_path`` read by `read_weights` (the usual wrappers and prefixes removed, then
    timm's own conversion for the architecture: a DINOv2 checkpoint such as DinoBloom's
    loads into timm's ``vit_*_patch14_dinov2`` models, position embeddings resampled to
    ``img_size``). ``pretrained`` only asserts that weights are wanted: without
    ``weights_path`` it raises RuntimeError. ``name`` must be a timm model (else ValueError).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights_path: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm  # here, not at module load: importing timm takes seconds

        if not timm.is_model(name):
            raise ValueError(
                f"unknown instance encoder {name!r}: neither built-in {list(ENCODERS)} "
                "nor a timm model name"
            )
        if pretrained and weights_path is None:
            raise RuntimeError(
                f"pretrained weights for {name!r} cannot be downloaded at run time; save them "
                "once to a local file and pass it as weights_path"
            )
        if weights_path is not None:
            _existing(weights_path)
        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
        except TypeError as exc:
            raise SettingError(
                f"timm model {name!r} does not take encoder_kwargs {sorted(model_kwargs)}: {exc}"
            ) from exc
        self.out_dim: int = self.model.num_features  # type: ignore[assignment]
        if weights_path is not None:
            state = read_weights(weights_path, self.model.state_dict())
            state = _timm_conversion(self.model)(state, self.model)
            load_weights(self.model, state, weights_path, f"the timm backbone {name!r}")

    def forward(self, x: Tensor) -> Tensor:
        """``x[M, C, H, W]`` -> ``[M, out_dim]``."""
        return self.model(x)


WEIGHT_CONTAINERS = ("teacher", "state_dict", "model", "module", "network")
"""Keys under which training checkpoints keep a state dict (``teacher``: DINO's EMA network,
DinoBloom's layout), tried in this order when the file's top level holds no tensors."""
HEAD_KEYS = ("head", "fc.", "classifier", "dino_head", "ibot_head", "mask_token")
"""Key prefixes of a file that are not the backbone and are ignored when left over."""


def read_weights(path: str, wanted: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict in the weights file ``path``, unwrapped for a module whose own keys are
    ``wanted``: a container key of `WEIGHT_CONTAINERS` is entered while the level holds no
    tensor, then the key prefix of a wrapping network (``module.``, ``backbone.``,
    ``model.encoder.``, ...) is removed: the one after which most keys are the module's."""
    content: Any = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(content, Mapping) and not any(isinstance(v, Tensor) for v in content.values()):
        inner = next((content[k] for k in WEIGHT_CONTAINERS if k in content), None)
        if not isinstance(inner, Mapping):
            break
        content = inner
    if not isinstance(content, Mapping):
        raise EncoderWeightsError(f"{path} holds no state dict (a mapping of names to tensors)")
    state = {str(k): v for k, v in content.items() if isinstance(v, Tensor)}
    prefixes: Counter[str] = Counter()
    for key in state:
        for own in wanted:
            if key.endswith(own) and (len(key) == len(own) or key[-len(own) - 1] == "."):
                prefixes[key[: len(key) - len(own)]] += 1
    prefix = prefixes.most_common(1)[0][0] if prefixes else ""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_weights(
    module: nn.Module, state: Mapping[str, Tensor], path: str, what: str = "the encoder"
) -> None:
    """Load ``state`` into ``module`` (``what``, for messages): every key of the module must
    be in ``state`` with its shape, and every key of ``state`` must be the module's or a head
    (`HEAD_KEYS`); else an `EncoderWeightsError` naming the file and a few of the keys at
    fault."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(HEAD_KEYS)]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(found)} {what} (e.g. {', '.join(found[:4])})"
        for what, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if found
    ]
    if problems:
        raise EncoderWeightsError(f"weights in {path} do not fit {what}: {'; '.join(problems)}")
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def _timm_conversion(model: nn.Module) -> Any:
    """timm's own ``checkpoint_filter_fn`` for the architecture of ``model`` (it converts
    other layouts such as DINOv2's and resamples position embeddings), or the identity."""
    module = sys.modules.get(type(model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if convert is None:
        return lambda state, model: state
    return convert


ENCODERS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "small_cnn": (SmallCNN, ("out_dim",)),
    "lenet": (LeNetEncoder, ("out_dim",)),
    "mlp": (MLPEncoder, ("in_dim", "out_dim")),
    "identity": (IdentityEncoder, ("in_dim",)),
    "morphology": (MorphologyEncoder, ()),
}
"""The built-in encoders by name, as `build_instance_encoder` and the models' ``encoder.name``
take them: each one's class and which of ``in_dim`` and ``out_dim`` it takes. An encoder that
takes ``in_dim`` reads feature vectors ``float[M, in_dim]``, the others image crops. Any
other name is a timm model (`TimmEncoder`)."""
FEATURE_ENCODERS: tuple[str, ...] = tuple(n for n, (_, s) in ENCODERS.items() if "in_dim" in s)
"""The encoders of feature vectors (the others read image crops)."""


def build_instance_encoder(
    name: str,
    *,
    in_dim: int | None = None,
    out_dim: int = 128,
    pretrained: bool = False,
    weights_path: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The encoder called ``name``: a key of `ENCODERS` or any timm model name.

    ``in_dim`` is required by the encoders of feature vectors; ``out_dim`` is ignored by those
    that do not take it (`ENCODERS`) and by timm models (whose ``out_dim`` is their feature
    size); ``kwargs`` go to the encoder's constructor. ``weights_path``: a local weights
    file, the timm backbone's state dict or the built-in module's (loaded strictly);
    ``pretrained`` applies to timm models only and needs ``weights_path`` (nothing is
    downloaded).
    """
    if name not in ENCODERS:
        return TimmEncoder(name, pretrained=pretrained, weights_path=weights_path, **kwargs)
    if pretrained:
        raise ValueError(
            f"pretrained applies to timm models; the built-in {name!r} takes its trained "
            "weights from a local file: weights_path"
        )
    cls, sizes = ENCODERS[name]
    if "in_dim" in sizes and in_dim is None:
        raise ValueError(f"instance encoder {name!r} needs in_dim")
    given = {"in_dim": in_dim, "out_dim": out_dim}
    module = cls(**{size: given[size] for size in sizes}, **kwargs)
    if weights_path is not None:
        state = read_weights(_existing(weights_path), module.state_dict())
        built = f"the {name!r} encoder built with out_dim={out_dim}, {kwargs or 'defaults'}"
        load_weights(module, state, weights_path, built)
    return module


@dataclass(frozen=True)
class EncoderSettings:
    """An instance encoder as models take it (``encoder:`` of a model's config).

    name: a key of `ENCODERS` ("small_cnn": fast on CPU, GroupNorm; "lenet": 28 px digits;
        "morphology": fixed hand-crafted features of the centred cell; "mlp" or "identity":
        precomputed features, need ``in_dim``) or any timm model name.
    out_dim: output size of the encoders that take one (`ENCODERS`; the others keep their
        own).
    in_dim: feature size of precomputed feature bags: the datamodule's
        (``FeatureBagDataModule.in_dim``, ``CachedFeatureDataModule.feature_dim``).
    kwargs: extra constructor arguments of the encoder.
    weights: local weights file (a timm backbone's or a built-in encoder's state dict;
        nothing is downloaded).
    freeze: keep the encoder fixed (eval mode, no gradients).
    shape_multiple: top each encoder call up to a multiple of this many crops (repeats,
        outputs dropped; see `encode_instances`): a few input shapes instead of one per
        number of crops in a batch, for cuDNN plans and compiled encoders on a GPU.
    channels_last: keep the encoder's weights and 4-D inputs channels-last (faster convs on
        CUDA under mixed precision; `lympho_mil.nn.acceleration`).
    compile: ``torch.compile`` the encoder in place (checkpoints stay loadable with or
        without it); compilation costs seconds to minutes at the first batches.
    """

    name: str = "small_cnn"
    out_dim: int = 128
    in_dim: int | None = None
    kwargs: dict[str, Any] | None = None
    weights: str | None = None
    freeze: bool = False
    shape_multiple: int | None = None
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        check_positive(out_dim=self.out_dim, in_dim=self.in_dim, shape_multiple=self.shape_multiple)
        check_not_none_text("model.encoder", weights=self.weights)

    @property
    def reads_features(self) -> bool:
        """True for an encoder of feature vectors, False for one of image crops."""
        return self.name in FEATURE_ENCODERS


def build_encoder(settings: EncoderSettings) -> nn.Module:
    """The encoder ``settings`` describe: built (its initial weights drawn from torch's
    generator, or read from ``settings.weights``), then frozen, channels-last and compiled as
    they ask."""
    module = build_instance_encoder(
        settings.name,
        in_dim=settings.in_dim,
        out_dim=settings.out_dim,
        weights_path=settings.weights,
        **(settings.kwargs or {}),
    )
    if settings.freeze:
        freeze(module)
    if settings.channels_last:
        use_channels_last(module)
    if settings.compile:
        module.compile()  # in place: state_dict keys stay unprefixed, checkpoints portable
    return module


def encoder_out_dim(encoder: nn.Module) -> int:
    """The ``out_dim`` that every instance encoder exposes (typed here: ``nn.Module`` knows
    its attributes only as tensors or modules)."""
    return int(cast(SupportsInt, encoder.out_dim))


def _existing(weights_path: str) -> str:
    """``weights_path`` if it is a file, else a ``FileNotFoundError`` that says what to do."""
    if not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"weights file not found: {weights_path} (a lympho-mil checkpoint carries the "
            "encoder's weights: with --ckpt_path, set encoder_weights to null)"
        )
    return weights_path


def _keep_eval(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook undoing any ``train()`` called on a frozen module."""
    if module.training:
        module.eval()


def freeze(module: nn.Module) -> None:
    """Turn ``module`` into a fixed function: no parameter requires grad, eval mode.

    Eval mode (frozen norm statistics, no dropout) is undone by any later ``train()`` call,
    e.g. Lightning's at each epoch; a forward pre-hook therefore puts the module back in
    eval mode before every forward. The hook stays (there is no unfreeze). Idempotent.
    """
    module.requires_grad_(False)
    module.eval()
    if _keep_eval not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_keep_eval)


def encode_instances(
    encoder: nn.Module,
    instances: Tensor,
    mask: Tensor,
    chunk_size: int | None = None,
    shape_multiple: int | None = None,
) -> Tensor:
    """Encode the real instances of padded bags: ``instances[B, N, ...]``, ``mask[B, N]``.

    Only the ``M = mask.sum()`` real instances reach ``encoder``, in chunks of at most
    ``chunk_size`` (None: all at once). With ``shape_multiple``, each chunk is topped up to a
    multiple of it with repeats of its own first instances, whose outputs are dropped: the
    encoder then sees a few input shapes instead of one per value of ``M`` (on CUDA each new
    shape costs cuDNN new plans, and a compiled encoder a new graph); the repeats count twice
    in BatchNorm statistics. Returns ``h[B, N, D]`` in the encoder's output dtype, zero where
    ``mask`` is False. One host sync per call.
    """
    for name, value in (("chunk_size", chunk_size), ("shape_multiple", shape_multiple)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer or None, got {value}")
    index = mask.nonzero(as_tuple=True)
    flat = instances[index]
    chunks = flat.split(chunk_size) if chunk_size is not None else (flat,)
    h_flat = torch.cat([_encode_topped_up(encoder, chunk, shape_multiple) for chunk in chunks])
    out = h_flat.new_zeros(*mask.shape, *h_flat.shape[1:])
    return out.index_put(index, h_flat)


def _encode_topped_up(encoder: nn.Module, x: Tensor, multiple: int | None) -> Tensor:
    """``encoder(x)``, run on ``x`` topped up to a multiple of ``multiple`` rows (repeats)."""
    extra = -len(x) % multiple if multiple is not None and len(x) > 0 else 0
    if extra == 0:
        return encoder(x)
    repeats = torch.arange(extra, device=x.device) % len(x)
    return encoder(torch.cat([x, x[repeats]]))[: len(x)]
