"""``lympho-mil pretrain``: the crop encoder of a config, pretrained with SimCLR (or DINO) on
the crops themselves (labels unused), written where the config reads it.

    lympho-mil pretrain --config CFG --data.root DLMI [--pretrain.extra_roots '[DIR, ...]']
                        [--pretrain.settings.epochs 100 ...] [--pretrain.out FILE]
                        [--pretrain.overwrite true] [--pretrain.device cuda]

The config is a fit config of `CachedFeatureDataModule` whose ``features`` are a ``small_cnn``
(``examples/configs/dlmi_images_ssl.yaml``): every crop of ``--data.root`` and of the extra
folders (e.g. the unlabelled patients you will predict) is decoded as its ``crops`` say, the
`SmallCNN` of its ``features.kwargs`` is pretrained (`lympho_mil.features.pretrain`, with a
progress bar; cached by the pixels and settings, so a second run loads it) and the weights
are written to its ``features.weights`` file (or ``--pretrain.out``). ``fit`` with the same
config then extracts features with them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lympho_mil.arguments import plain
from lympho_mil.cli.app import Command, LymphoCLI, register
from lympho_mil.cli.errors import ConfigError
from lympho_mil.data.image_cache import default_cache_dir
from lympho_mil.data.settings import CropSettings
from lympho_mil.features.pretrain import (
    PretrainSettings,
    crops_digests,
    encoder_cache_file,
    folder_crops,
    pretrained_encoder,
)
from lympho_mil.files import atomic_write_bytes


@dataclass(frozen=True)
class PretrainOptions:
    """The options of ``lympho-mil pretrain`` (``--pretrain.<name>``, or a ``pretrain:``
    section of a config).

    Args:
        extra_roots: further DLMI folders whose crops are pretrained on too (their labels,
            if any, unused), e.g. the unlabelled patients.
        settings: the pretraining (`PretrainSettings`: SimCLR, or ``method: dino``); the
            encoder's shape (``width``, ``out_dim``) is the config's ``data.features.kwargs``.
        out: where the weights go (default: the config's ``data.features.weights``).
        overwrite: replace another weights file at ``out``.
        device: where to train (``cpu``, or ``cuda`` on a GPU machine; the cache key does
            not depend on it).
    """

    extra_roots: list[str] = field(default_factory=list)
    settings: PretrainSettings = field(default_factory=PretrainSettings)
    out: str | None = None
    overwrite: bool = False
    device: str = "cpu"


def _plain(value: Any) -> Any:
    """A parsed section (a jsonargparse Namespace, a dataclass or None) as a dict."""
    if value is None:
        return {}
    value = plain(value)
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def encoder_settings(settings: PretrainSettings, kwargs: dict[str, Any]) -> PretrainSettings:
    """``settings`` with the encoder's shape of the config's ``features.kwargs``; a shape set
    in ``settings`` too must agree."""
    names = ("width", "out_dim")
    shape = {name: kwargs.get(name, getattr(PretrainSettings, name)) for name in names}
    given = {
        name: getattr(settings, name)
        for name in shape
        if getattr(settings, name) != getattr(PretrainSettings, name)
    }
    clash = {name: value for name, value in given.items() if value != shape[name]}
    if clash:
        raise ConfigError(
            f"the encoder's shape is the config's data.features.kwargs ({shape}); "
            f"--pretrain.settings says {clash}: set it in the config only"
        )
    return dataclasses.replace(settings, **shape)


def run_pretrain(cli: LymphoCLI) -> None:
    """Run ``lympho-mil pretrain`` on the parsed command line."""
    parsed = cli.config["pretrain"]
    own = _plain(parsed["pretrain"])
    options = PretrainOptions(
        **{**own, "settings": PretrainSettings(**_plain(own.get("settings")))}
    )
    data = parsed["data"]
    init = _plain(data.get("init_args"))
    features = _plain(init.get("features"))
    if not str(data.get("class_path", "")).endswith("CachedFeatureDataModule") or (
        features.get("encoder") != "small_cnn"
    ):
        raise ConfigError(
            "lympho-mil pretrain trains the small_cnn of a CachedFeatureDataModule config "
            "(data.features.encoder: small_cnn), e.g. examples/configs/dlmi_images_ssl.yaml; "
            f"this config's data is {data.get('class_path')} with encoder "
            f"{features.get('encoder')!r}"
        )
    out = options.out or features.get("weights")
    if not out:
        raise ConfigError(
            "say where the weights go: data.features.weights in the config, or --pretrain.out"
        )
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--pretrain.device {options.device}: no CUDA GPU here (use cpu)")
    missing = [root for root in options.extra_roots if not Path(root).expanduser().is_dir()]
    if missing:
        raise ConfigError(f"--pretrain.extra_roots: no folder {missing[0]}")
    settings = encoder_settings(options.settings, features.get("kwargs") or {})
    crops = CropSettings(**_plain(init.get("crops")))
    roots = [init["root"], *options.extra_roots]
    arrays, patients = folder_crops(roots, crops)
    cache_dir = Path(crops.cache_dir).expanduser() if crops.cache_dir else default_cache_dir()
    target = Path(out).expanduser()
    digests = crops_digests(arrays, settings, patients)
    known = encoder_cache_file(digests, settings, crops.mean, crops.std, cache_dir)
    same = known.is_file() and target.is_file() and target.read_bytes() == known.read_bytes()
    if target.is_file() and not same and not options.overwrite:  # refused before training
        raise ConfigError(
            f"{target} holds other weights than this pretraining's; --pretrain.overwrite true "
            "replaces them"
        )
    earlier = known.is_file()
    cached = pretrained_encoder(
        arrays, settings, crops.mean, crops.std, cache_dir, options.device, patients
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, cached.read_bytes(), overwrite=True)
    meta = json.loads(cached.with_suffix(".json").read_text())
    how = "loaded from the cache, pretrained earlier" if earlier else "pretrained"
    print(
        f"encoder {how} on {meta['crops']} crops of {len(roots)} folder(s) in "
        f"{meta['seconds']:.0f} s (final loss {meta['loss'][-1]:.3f}; cached as {cached}) "
        f"-> {target}"
    )
    if options.out and options.out != features.get("weights"):
        print(f"fit with it: --data.features.weights {target}")


register(
    "pretrain",
    Command(
        "pretrain a config's crop encoder with SimCLR or DINO on the crops themselves "
        "(labels unused), cached, for its features",
        PretrainOptions,
        run_pretrain,
    ),
)
