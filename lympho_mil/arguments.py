"""Checks of constructor arguments, shared by models and datamodules: a bad setting is a
ValueError naming it at construction, not an error deep inside the first step; and the
settings dataclasses that group related arguments, as given or as plain mappings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class SettingError(ValueError):
    """A constructor argument that cannot work; the message names it (on the command line:
    one line, exit 2)."""


def check_positive(**settings: float | None) -> None:
    """SettingError naming the first setting that is set (not None) and not > 0."""
    for name, value in settings.items():
        if value is not None and not value > 0:
            raise SettingError(f"{name} must be > 0, got {value}")


def check_share(name: str, value: float, one_allowed: bool = True) -> None:
    """SettingError unless ``value`` is in [0, 1] ([0, 1) with ``one_allowed=False``)."""
    if not (0.0 <= value <= 1.0 if one_allowed else 0.0 <= value < 1.0):
        interval = "[0, 1]" if one_allowed else "[0, 1)"
        raise SettingError(f"{name} must be in {interval}, got {value}")


def check_not_none_text(group: str, **settings: str | None) -> None:
    """SettingError for a setting of ``group`` (its option, e.g. ``data.features``) that holds
    the text ``"None"``: on the command line, ``--data.features.weights null`` reaches a
    group's text field as ``"None"`` (jsonargparse), so say how to give a null there instead
    of looking for a file named "None"."""
    for name, value in settings.items():
        if value == "None":
            raise SettingError(
                f"{group}.{name} is the text 'None': to give null inside a group, write the group "
                f"as a mapping: --{group} '{{{name}: null}}'"
            )


def as_settings(cls: type[T], value: T | Mapping[str, Any]) -> T:
    """``value`` as the settings dataclass ``cls``: itself, or built from a mapping of its
    fields (what a checkpoint's hyperparameters and plain Python give); a SettingError names
    an unknown field."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise SettingError(f"{cls.__name__} settings must be a mapping, got {value!r}")
    unknown = set(value) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise SettingError(f"unknown {cls.__name__} settings {sorted(unknown)}")
    return cls(**value)


def plain(value: Any) -> Any:
    """A settings dataclass as a dict of its fields (anything else as it is): what checkpoints
    and logs keep, so that they load without lympho-mil's classes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
