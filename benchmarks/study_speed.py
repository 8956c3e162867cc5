"""Speed studies of the harness.

``import-times``: wall time of a fresh interpreter that imports ``torch``, ``lympho_mil``,
``lympho_mil.nn`` or ``lympho_mil.models``, each run ``--runs`` times in turn; medians and
ratios to ``import torch`` measured in the same run (absolute times move with the machine's
load, ratios much less).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from harness import Record, study

IMPORTS = ("torch", "lympho_mil", "lympho_mil.nn", "lympho_mil.models")


def _import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=7)


@study(
    "import-times", "import time of lympho_mil and lympho_mil.nn against torch", import_arguments
)
def import_times(args: argparse.Namespace) -> Iterator[Record]:
    times: dict[str, list[float]] = {m: [] for m in IMPORTS}
    for _ in range(args.runs):
        for module in IMPORTS:  # interleaved: a load change hits every module alike
            times[module].append(_import_seconds(module))
    torch_median = statistics.median(times["torch"])
    for module, seconds in times.items():
        median = statistics.median(seconds)
        yield {
            "record": "import",
            "module": module,
            "median_s": round(median, 3),
            "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3),
            "ratio_to_torch": round(median / torch_median, 2),
            "runs": args.runs,
        }
