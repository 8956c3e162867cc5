"""Run a named benchmark study: ``python benchmarks/run.py STUDY [options]``.

``python benchmarks/run.py --help`` lists the studies (registered with `harness.study` in the
``study_*`` modules of this folder, each imported here); each prints JSON lines, and
``--record`` keeps them in ``benchmarks/results/<study>.jsonl`` for the docs tables
(``python benchmarks/tables.py``).
"""

import importlib
import sys
from pathlib import Path

from harness import run


def main(argv: list[str] | None = None) -> None:
    """Register every ``study_*`` module's studies, then run the one ``argv`` names. A module
    that cannot be imported here (a machine without one of its packages, e.g. a lent GPU) is
    named on stderr and its studies are left out."""
    for path in sorted(Path(__file__).resolve().parent.glob("study_*.py")):
        try:
            importlib.import_module(path.stem)
        except ImportError as error:
            print(f"{path.name} left out: {error}", file=sys.stderr)
    run(argv)


if __name__ == "__main__":  # worker processes (spawned) import this module without running it
    main()
