"""The benchmark harness: named studies, one entry point, one JSON-lines format.

A study is a function registered with `study`; it takes the parsed common arguments and
yields records (dicts, each with a ``record`` kind). `run` prints each record as a JSON line
and, with ``--record [NAME]``, writes them all to ``benchmarks/results/<NAME>.jsonl`` (NAME:
the study's by default; what docs tables are made from, by ``python benchmarks/tables.py``),
each line carrying the study, the command, the commit, the date and the machine, so that
every figure in the docs traces back to a run.

Also what the studies share: a quiet Lightning trainer, tasks in worker processes with their
CPU time, and the ``--threads`` convention (0: torch's default).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    import lightning as L

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "dlmi-dev"
DEFAULT_UNLABELLED = HERE.parents[1] / "shared" / "data" / "dlmi-unlabelled"
SHARED_DATA = HERE.parents[1] / "shared" / "data"

Record = dict[str, Any]
T = TypeVar("T")
StudyFunction = Callable[[argparse.Namespace], Iterator[Record]]


@dataclass(frozen=True)
class Study:
    """A registered study: its function, a one-line description, extra arguments, and its
    default of ``--threads`` (0: torch's default)."""

    run: StudyFunction
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    threads: int = 1


STUDIES: dict[str, Study] = {}


def study(
    name: str,
    help: str,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    threads: int = 1,
) -> Callable[[StudyFunction], StudyFunction]:
    """Register the decorated function as the study ``name``."""

    def register(function: StudyFunction) -> StudyFunction:
        STUDIES[name] = Study(function, help, arguments, threads)
        return function

    return register


def machine() -> Record:
    """Where a figure comes from; the load average matters on a shared machine."""
    info: Record = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 1) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def commit() -> str:
    """The checkout's commit (with ``+`` when tracked files other than prose and recorded
    results have changes: a docs edit does not change a figure), or "unknown"."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        unchanged = [":(top,exclude)*.md", ":(top,exclude)benchmarks/results"]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", *unchanged],
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
    """The entry point's arguments: the study, then the common and the study's own ones (a
    study may redefine a common one, e.g. ``--data``, or change its default)."""
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Run a named benchmark study; its records are printed as JSON lines.",
    )
    sub = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, entry in sorted(STUDIES.items()):
        s = sub.add_parser(
            name, help=entry.help, description=entry.help, conflict_handler="resolve"
        )
        s.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a DLMI folder")
        s.add_argument("--cache-dir", default=None, help="caches (default: LYMPHO_MIL_CACHE)")
        s.add_argument("--out", type=Path, default=None, help="working folder of the study")
        s.add_argument(
            "--threads",
            type=int,
            default=entry.threads,
            help=f"torch threads (0: torch's default; default {entry.threads})",
        )
        s.add_argument(
            "--record",
            nargs="?",
            const=name,
            default=None,
            metavar="NAME",
            help=f"write the records to benchmarks/results/NAME.jsonl (default NAME: {name})",
        )
        if entry.arguments is not None:
            entry.arguments(s)
    return p


def command(argv: Sequence[str]) -> str:
    """The command line that ran ``argv``, from the folder it ran in (relative paths in
    ``argv`` stay right): ``python benchmarks/run.py ...`` from the repository root."""
    where = Path.cwd().resolve()
    if where == HERE.parent:
        script = "benchmarks/run.py"
    elif where == HERE:
        script = "run.py"
    else:
        script = str(HERE / "run.py")
    line = shlex.join(["python", script, *argv])
    return f"cd benchmarks && {line}" if where == HERE else line


def run(argv: list[str] | None = None) -> None:
    """Parse ``argv``, run the study, print (and with ``--record`` write) its records."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    header = {
        "command": command(argv),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    lines = []
    for record in STUDIES[args.study].run(args):
        line = json.dumps({"study": args.study, **record, **header}, default=str)
        print(line, flush=True)
        lines.append(line)
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.record}.jsonl").write_text("".join(f"{x}\n" for x in lines))


def read_records(name: str, results: Path = RESULTS) -> list[Record]:
    """The recorded lines of ``results/<name>.jsonl``."""
    path = results / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def quiet_trainer(**settings: Any) -> L.Trainer:
    """``L.Trainer`` on the CPU unless told otherwise, without logger, checkpoints, progress
    bar or model summary; ``settings`` on top."""
    import lightning as L

    quiet_settings = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }
    return L.Trainer(**{**quiet_settings, **settings})


def _worker_start(threads: int) -> None:
    import lightning  # noqa: F401  (first: its import resets the levels `quiet` sets)

    if threads > 0:
        torch.set_num_threads(threads)
    quiet()


class Timed:
    """``fn`` returning ``(result, CPU seconds it took)`` (picklable for worker processes)."""

    def __init__(self, fn: Callable[[T], Any]) -> None:
        self.fn = fn

    def __call__(self, task: T) -> tuple[Any, float]:
        start = time.process_time()
        result = self.fn(task)
        return result, time.process_time() - start


def run_tasks(
    fn: Callable[[T], Any], tasks: Sequence[T], jobs: int, threads: int
) -> Iterator[tuple[Any, float]]:
    """``(fn(t), CPU seconds)`` for each task, in order, from ``jobs`` worker processes of
    ``threads`` torch threads each (``fn`` picklable: a module-level function or a partial)."""
    if jobs == 1:
        yield from map(Timed(fn), tasks)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=_worker_start, initargs=(threads,)) as pool:
        yield from pool.map(Timed(fn), tasks)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run studies with: python benchmarks/run.py STUDY")
