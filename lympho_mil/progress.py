"""Progress of long one-off steps (decoding crops, extracting features, pretraining).

On a terminal a tqdm bar; otherwise (CI, a log file) a few plain lines on stderr: at the
start, after every tenth of the work or minute (whichever comes first), and at the end, each
with the elapsed time and an estimate of the rest. Lightning keeps its own bar for training.
`set_log_level` (the command line's ``--log_level``) silences them, or shows lympho-mil's own
log messages too.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

LOG_LEVELS = ("debug", "info", "warning", "error")
"""What ``--log_level`` takes: ``info`` (the default) shows progress and lympho-mil's
messages, ``warning`` and ``error`` hide the progress too, ``debug`` shows everything."""
_shown = True  # whether progress is shown (set_log_level)


def set_log_level(level: str) -> None:
    """Show lympho-mil's log messages of ``level`` and above on stderr, and progress unless
    ``level`` is ``warning`` or ``error``; ValueError for a level not in `LOG_LEVELS`."""
    global _shown
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {LOG_LEVELS}, got {level!r}")
    _shown = level in ("debug", "info")
    package = logging.getLogger("lympho_mil")
    package.setLevel(level.upper())
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("lympho-mil: %(message)s"))
        package.addHandler(handler)
        package.propagate = False


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, say)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class Progress(Protocol):
    """What a long step reports: ``update(n)`` after each piece of work, ``note(text)``
    for a figure to show beside the count (a loss, say)."""

    def update(self, n: int = 1) -> None: ...

    def note(self, text: str) -> None: ...


class _Lines:
    """Plain progress lines, about ``steps`` of them, for output that is not a terminal."""

    def __init__(
        self, desc: str, total: int, unit: str, steps: int = 10, every_s: float = 60
    ) -> None:
        self.desc, self.total, self.unit = desc, max(total, 1), unit
        self.done, self.every, self.every_s = 0, max(1, self.total // steps), every_s
        self.start = self.last = time.perf_counter()
        self.text = ""
        self.next_line = self.every
        _write(f"{desc}: {total} {unit}")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.done >= self.next_line or self.done >= self.total or now - self.last > self.every_s:
            self.next_line, self.last = self.done + self.every, now
            elapsed = now - self.start
            rest = elapsed / self.done * max(self.total - self.done, 0)
            note = f", {self.text}" if self.text else ""
            _write(
                f"{self.desc}: {self.done}/{self.total} {self.unit} "
                f"({elapsed:.0f} s, about {rest:.0f} s left{note})"
            )

    def note(self, text: str) -> None:
        self.text = text


class _Bar:
    def __init__(self, desc: str, total: int, unit: str) -> None:
        from tqdm import tqdm  # Lightning's own progress dependency

        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def _write(line: str) -> None:
    print(f"lympho-mil: {line}", file=sys.stderr, flush=True)


@contextmanager
def progress(desc: str, total: int, unit: str = "crops") -> Iterator[Progress]:
    """Report ``total`` units of work called ``desc``: a bar on a terminal, else lines (or
    nothing, after ``set_log_level("warning")``)."""
    reporter: _Bar | _Lines | _Silent
    if not _shown:
        reporter = _Silent()
    elif sys.stderr.isatty():
        reporter = _Bar(desc, total, unit)
    else:
        reporter = _Lines(desc, total, unit)
    try:
        yield reporter
    finally:
        if isinstance(reporter, _Bar):
            reporter.bar.close()
