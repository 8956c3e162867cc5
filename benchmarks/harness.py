"""The benchmark harness: named studies, one entry point, one JSON-lines format.

A study is a function registered with `study`; it takes the parsed common arguments and
yields records (dicts). `run` prints each record as a JSON line and, with ``--record``,
writes them all to ``benchmarks/results/<study>.jsonl`` (what docs tables are made from, by
``python benchmarks/tables.py``), each line carrying the study, the commit and the machine, so
that every figure in the docs traces back to a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "dlmi-dev"
DEFAULT_UNLABELLED = HERE.parents[1] / "shared" / "data" / "dlmi-unlabelled"

Record = dict[str, Any]
StudyFunction = Callable[[argparse.Namespace], Iterator[Record]]


@dataclass(frozen=True)
class Study:
    """A registered study: its function, a one-line description, extra arguments."""

    run: StudyFunction
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


STUDIES: dict[str, Study] = {}


def study(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[StudyFunction], StudyFunction]:
    """Register the decorated function as the study ``name``."""

    def register(function: StudyFunction) -> StudyFunction:
        STUDIES[name] = Study(function, help, arguments)
        return function

    return register


def machine() -> Record:
    """Where a figure comes from; the load average matters on a shared machine."""
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 1) for x in os.getloadavg()],
    }


def commit() -> str:
    """The checkout's commit (with ``+`` when the tree has changes), or "unknown"."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (sha + ("+" if dirty else "")) or "unknown"


def quiet() -> None:
    """Silence Lightning's per-fit chatter."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def parser() -> argparse.ArgumentParser:
    """The entry point's arguments: the study, then the common and the study's own ones."""
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Run a named benchmark study; its records are printed as JSON lines.",
    )
    sub = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, entry in sorted(STUDIES.items()):
        s = sub.add_parser(name, help=entry.help, description=entry.help)
        s.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a DLMI folder")
        s.add_argument("--cache-dir", default=None, help="caches (default: LYMPHO_MIL_CACHE)")
        s.add_argument("--out", type=Path, default=None, help="working folder of the study")
        s.add_argument("--threads", type=int, default=1, help="torch threads")
        s.add_argument(
            "--record",
            action="store_true",
            help=f"write the records to {RESULTS.relative_to(HERE.parent)}/<study>.jsonl",
        )
        if entry.arguments is not None:
            entry.arguments(s)
    return p


def run(argv: list[str] | None = None) -> None:
    """Parse ``argv``, run the study, print (and with ``--record`` write) its records."""
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    header = {"commit": commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine()}
    lines = []
    for record in STUDIES[args.study].run(args):
        line = json.dumps({"study": args.study, **record, **header}, default=str)
        print(line, flush=True)
        lines.append(line)
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.study}.jsonl").write_text("".join(f"{x}\n" for x in lines))


def read_records(name: str) -> list[Record]:
    """The recorded lines of study ``name``."""
    path = RESULTS / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run studies with: python benchmarks/run.py STUDY")
