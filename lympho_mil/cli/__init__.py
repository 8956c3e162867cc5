"""The command layer: the one ``lympho-mil`` command and everything only it needs.

``app`` holds the LightningCLI (its subcommands, parser, links and checkpoint policy) and the
registry of further subcommands, ``cv`` the cross-validation subcommand and its
config-driven fold runner, ``bag`` the fit of the bag that cv measures with inner folds,
``evaluate`` the external validation of checkpoints on another
labelled cohort, ``pretrain`` the self-supervised pretraining of a config's crop encoder,
``checkpoints`` how commands read checkpoint files, ``parser`` and ``errors`` how a bad input
becomes one line. Nothing below this package (evaluation,
models, data, nn) imports it; `main` is the entry point.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from typing import NoReturn

from lympho_mil.cli.app import LymphoCLI, build_cli, check_class_names, without_lightning_noise
from lympho_mil.cli.bag import BagOptions
from lympho_mil.cli.cv import ConfigRunner, compare_configs, cross_validate
from lympho_mil.cli.errors import USER_ERRORS, ConfigError, user_error_behind
from lympho_mil.cli.evaluate import evaluate_checkpoints
from lympho_mil.cli.pretrain import PretrainOptions
from lympho_mil.files import write_error_message

__all__ = [
    "BagOptions",
    "ConfigError",
    "ConfigRunner",
    "LymphoCLI",
    "PretrainOptions",
    "build_cli",
    "compare_configs",
    "cross_validate",
    "evaluate_checkpoints",
    "main",
]


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lympho-mil`` and ``python -m lympho_mil``."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        check_class_names(argv)
        with without_lightning_noise():
            build_cli(None if args is None else argv)
    except USER_ERRORS as exc:
        fail(str(exc))
    except ValueError as exc:  # jsonargparse wraps what a class raised while instantiated
        cause = user_error_behind(exc)
        message = str(cause) if cause is not None else write_error_message(exc)
        if message is None:
            raise
        fail(message)
    except OSError as exc:  # a full disk, a read-only folder: the file, not a traceback
        message = write_error_message(exc)
        if message is None:
            raise
        fail(message)
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" not in str(exc):
            raise
        lines = str(exc).splitlines()
        fail(
            "the checkpoint's weights do not fit the model that the config and data build (use "
            "the config and data it was trained with): "
            + " ".join(line.strip() for line in lines[:3])
        )
    except pickle.UnpicklingError as exc:
        fail(
            "refusing to load a checkpoint that holds more than tensors and plain values (it "
            "could run code when loaded; only weights_only=True loading is allowed): "
            f"{str(exc).splitlines()[0]}"
        )


def fail(message: str) -> NoReturn:
    """Print ``lympho-mil: error: <message>`` and exit with status 2."""
    print(f"lympho-mil: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None
