"""The command line's user errors: what counts as one, and how it finds the one behind a
wrapped exception. Each is shown as one line, ``lympho-mil: error: ...``, exit status 2."""

from __future__ import annotations

from pathlib import Path

from lympho_mil.arguments import SettingError
from lympho_mil.data.errors import DataError
from lympho_mil.evaluation.explain import ExplainError
from lympho_mil.files import OutputExistsError, OutputFolderError
from lympho_mil.models import CheckpointFormatError
from lympho_mil.nn import EncoderWeightsError


class ConfigError(ValueError):
    """A configuration names something that does not exist or cannot work together."""


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    SettingError,
    DataError,
    OutputExistsError,
    OutputFolderError,
    FileNotFoundError,
    CheckpointFormatError,
    EncoderWeightsError,
    ExplainError,
)
"""Errors caused by the user's input, not by a bug: one line, no traceback. (An unfinished
cross-validation planned otherwise, ``cv_plan.PlanChangedError``, is an OutputExistsError; a
full disk or a read-only folder met while writing is found by `files.write_error_message`.)"""


def user_error_behind(exc: BaseException) -> BaseException | None:
    """The first user error (bad data, files, weights, settings) in the chain of causes of
    ``exc``, or None: a bug, to show with its traceback."""
    seen: BaseException | None = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, USER_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def is_file(value: str) -> bool:
    """Whether ``value`` names a file (an inline config may be too long to be a path)."""
    try:
        return Path(value).is_file()
    except OSError:
        return False
