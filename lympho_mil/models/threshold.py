"""The decision threshold a model carries: its setting, and which one wins when a checkpoint
is loaded (the one it carries, chosen after training, or the one asked for)."""

from __future__ import annotations

from lympho_mil.arguments import SettingError


def check_threshold(threshold: float) -> None:
    """SettingError unless ``threshold`` is in (0, 1)."""
    if not 0.0 < threshold < 1.0:
        raise SettingError(f"threshold must be in (0, 1), got {threshold}")


def threshold_on_loading(
    saved_setting: float | None, setting: float, asked: bool, fitting: bool
) -> float | None:
    """The threshold that replaces a checkpoint's own on loading, or None to keep it.

    ``saved_setting``: the threshold setting the checkpoint was trained with (None: older
    versions); ``setting``: the loading model's; ``asked``: that setting was given on the
    command line; ``fitting``: the checkpoint resumes training. A threshold other than the
    checkpoint's own setting (or any, on the command line) wins over the one it carries (e.g.
    chosen on validation patients by ``fit`` or ``cv``); and training, resumed from it,
    evaluates at the setting, as it did before.
    """
    if asked or (saved_setting is not None and setting != saved_setting):
        return setting
    return saved_setting if fitting and saved_setting is not None else None
