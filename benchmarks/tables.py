"""Regenerate the markdown tables of the docs from the recorded runs of the harness.

    python benchmarks/tables.py [FILE ...] [--results DIR] [--check]

A table lives between two markers, each at the start of its line, in a markdown file
(default: ``docs/benchmarks.md`` and ``docs/results.md``)::

    <!-- table: NAME[:VIEW[:COLUMNS]] -->
    (generated: replaced on every run)
    <!-- /table -->

``NAME`` is a file of recorded runs, ``benchmarks/results/NAME.jsonl`` (written by
``python benchmarks/run.py STUDY --record [NAME]``; NAME is the study's by default). ``VIEW``
picks the table: a view of the study (the DLMI rounds: ``candidates``, the default, or only
the ``images`` or ``fused`` candidates beside the references), or a record kind (the
``record`` field, e.g. ``cv-cached:cv_cached``): one row per record of that kind, one column
per field. Without a view, every record of the file, one column per field. ``COLUMNS``
(comma-separated fields, a nested one as ``a.b``) keeps those columns of a per-field table,
in that order (``NAME::COLUMNS``: every record). Each table is
followed by a line naming the command, the commit and the date of its run, so every figure
traces back to a run. Running the script twice changes nothing the second time; ``--check``
changes nothing and fails if a table is not what the records make (or a marker names no
records).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS = (ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "results.md")
MARKER = re.compile(r"^<!-- table: (?P<spec>\S+) -->\n(?P<body>.*?)^<!-- /table -->", re.S | re.M)
OPENING = re.compile(r"^<!-- table: ", re.M)  # markers start a line; quoted ones do not count
HEADER = ("study", "command", "commit", "date", "machine")  # of the run, not of a record
METRIC = {"mean", "ci95_low", "ci95_high"}
METRICS = {"balanced_accuracy": "balanced accuracy", "auroc": "AUROC"}

Record = dict[str, Any]
Table = tuple[list[str], list[list[str]]]


def read(name: str, results: Path) -> list[Record]:
    """The records of ``results/<name>.jsonl``."""
    path = results / f"{name}.jsonl"
    if not path.is_file():
        raise SystemExit(f"no recorded run {path} (python benchmarks/run.py STUDY --record)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def interval(value: dict[str, float], signed: bool = False) -> str:
    """``{mean, ci95_low, ci95_high, ...}`` as ``0.795 [0.706, 0.874]`` (signed: ``+0.015``)."""
    form = "{:+.3f}" if signed else "{:.3f}"
    low, high = (form.format(value[k]) for k in ("ci95_low", "ci95_high"))
    return f"{form.format(value['mean'])} [{low}, {high}]"


def cell(value: Any) -> str:
    """One value in a table cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:,}"  # as recorded (studies round their own figures)
    if isinstance(value, dict) and value.keys() >= METRIC:
        return interval(value)
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|")


def fields(record: Record, prefix: str = "") -> dict[str, Any]:
    """The record's figures, nested dicts (but metric intervals) flattened to ``a.b`` keys."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if not prefix and key in HEADER:
            continue
        if isinstance(value, dict) and value and not value.keys() >= METRIC:
            flat |= fields(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def generic(records: list[Record], columns: list[str] | None = None) -> Table:
    """One row per record, one column per field (``columns``, or every field in the order
    they first appear, the record kind only when there are several)."""
    rows = [fields(r) for r in records]
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        if len({row.get("record") for row in rows}) == 1:
            columns = [c for c in columns if c != "record"]
    elif missing := [c for c in columns if all(c not in row for row in rows)]:
        raise SystemExit(f"no field {missing} in these records (fields: {sorted(rows[0])})")
    return [c.replace("_", " ") for c in columns], [[cell(r.get(c)) for c in columns] for r in rows]


def candidates(records: list[Record], keep: Callable[[str], bool] = lambda name: True) -> Table:
    """The candidates of a DLMI round (``record: candidate``): metrics with their intervals,
    the paired differences to each reference (``minus_<ref>``), the whole-CV time."""
    rows = [r for r in records if r.get("record") == "candidate"]
    names = [r["candidate"] for r in rows]
    refs = list(dict.fromkeys(k for r in rows for k in r if k.startswith("minus_")))
    refs.sort(key=lambda ref: names.index(ref[6:]) if ref[6:] in names else len(names))
    headers = ["candidate", *METRICS.values()]
    headers += [f"minus `{ref[6:]}`: {label}" for ref in refs for label in METRICS.values()]
    table = []
    for r in rows:
        if not (keep(r["candidate"]) or f"minus_{r['candidate']}" in refs):  # refs always
            continue
        line = [f"`{r['candidate']}`", *(interval(r[m]) for m in METRICS)]
        for ref in refs:
            diff = r.get(ref)
            line += [interval(diff[m], signed=True) if diff else "" for m in METRICS]
        seconds = r.get("whole_cv_s")
        table.append([*line, f"{seconds:,.0f} s" if seconds is not None else "no training"])
    return [*headers, "whole CV"], table


ROUND_VIEWS: dict[str, Callable[[list[Record]], Table]] = {
    "candidates": candidates,
    "images": lambda rs: candidates(rs, lambda name: name.startswith("images_")),
    "fused": lambda rs: candidates(rs, lambda name: name.startswith("fused_")),
}
DLMI_ROUNDS = tuple(f"dlmi-round{n}" for n in [*range(7, 25), 26, 27, 28, 29])  # 25 never ran
VIEWS: dict[str, dict[str, Callable[[list[Record]], Table]]] = dict.fromkeys(
    DLMI_ROUNDS, ROUND_VIEWS
)
DEFAULT_VIEW = dict.fromkeys(DLMI_ROUNDS, "candidates")


def table(spec: str, results: Path) -> str:
    """The generated block of the marker ``spec`` (``NAME[:VIEW[:COLUMNS]]``): table, then
    the line naming its run."""
    name, _, view = spec.partition(":")
    view, _, wanted = view.partition(":")
    columns = wanted.split(",") if wanted else None
    records = read(name, results)
    study = records[0].get("study", name)
    view = view or DEFAULT_VIEW.get(study, "")
    views = VIEWS.get(study, {})
    if view in views:
        if columns:
            raise SystemExit(f"{spec}: the view {view!r} has its own columns")
        headers, rows = views[view](records)
    else:
        kinds = list(dict.fromkeys(str(r.get("record")) for r in records))
        if view and view not in kinds:
            raise SystemExit(
                f"{spec}: no view or record kind {view!r} (views {sorted(views)}, "
                f"record kinds {kinds})"
            )
        chosen = [r for r in records if not view or r.get("record") == view]
        headers, rows = generic(chosen, columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(["", *lines, "", provenance(name, study, records), "", ""])


def provenance(name: str, study: str, records: list[Record]) -> str:
    """The line naming the run(s) the table was made from."""
    runs: dict[str, list[float]] = {}  # each run, and the load averages its records saw
    for r in records:
        command = r.get("command") or f"python benchmarks/run.py {study} (arguments not recorded)"
        run = f"`{command}` at commit `{r.get('commit', 'unknown')}`, {r.get('date', '?')}"
        load = r.get("machine", {}).get("load_avg")
        runs.setdefault(run, []).extend(load[:1] if load else [])
    described = []
    for run, loads in runs.items():
        low, high = (min(loads), max(loads)) if loads else (None, None)
        spread = f"{low}" if low == high else f"{low}-{high}"
        described.append(run + (f", load average {spread}" if loads else ""))
    return (
        f"Made from `benchmarks/results/{name}.jsonl` by `python benchmarks/tables.py`; run: "
        + ("; ".join(described) + ".")
    )


def regenerate(text: str, results: Path) -> str:
    """``text`` with every marked table made again from ``results``."""
    found = len(OPENING.findall(text))
    closed = len(MARKER.findall(text))
    if found != closed:
        raise SystemExit(f"{found - closed} table marker(s) without '<!-- /table -->'")
    return MARKER.sub(
        lambda m: f"<!-- table: {m['spec']} -->\n{table(m['spec'], results)}<!-- /table -->", text
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, default=list(DOCS), help="markdown files")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of NAME.jsonl files")
    p.add_argument("--check", action="store_true", help="write nothing; fail if out of date")
    args = p.parse_args(argv)
    stale = []
    for path in args.files:
        text = path.read_text(encoding="utf-8")
        new = regenerate(text, args.results)
        if new != text:
            stale.append(str(path))
            if not args.check:
                path.write_text(new, encoding="utf-8")
    verb = "out of date" if args.check else "updated"
    for path in stale:
        print(f"{verb}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
