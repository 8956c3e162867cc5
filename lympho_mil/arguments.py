"""Checks of constructor arguments, shared by models and datamodules: a bad setting is a
ValueError naming it at construction, not an error deep inside the first step."""

from __future__ import annotations


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
