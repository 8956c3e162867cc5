"""What the tests compare of two cv reports: everything but the times."""

from __future__ import annotations

from typing import Any

TIMING_KEYS = ("wall_time_s", "seconds")


def without_timing(value: Any) -> Any:
    """``value`` (a report, or part of one) without its `TIMING_KEYS`, at any depth."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value
