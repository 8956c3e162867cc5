"""Run a named benchmark study: ``python benchmarks/run.py STUDY [options]``.

``python benchmarks/run.py --help`` lists the studies (registered in the ``study_*`` modules
with `harness.study`); each prints JSON lines, and ``--record`` keeps them in
``benchmarks/results/<study>.jsonl`` for the docs tables (``python benchmarks/tables.py``).
"""

import study_dlmi  # noqa: F401  (each study_* module registers its studies)
import study_speed  # noqa: F401
from harness import run

if __name__ == "__main__":
    run()
