"""The external-validation report as a reader sees it: ``evaluation.md`` and ``report.html``.

``report.html`` is one self-contained page: the figures are embedded (base64 PNG), the style
is inline, there is no script and nothing is fetched; montage links point to files beside
the report, relative to its folder.
"""

from __future__ import annotations

import base64
import html
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lympho_mil.evaluation.bootstrap import COHORT_METRIC_NAMES, ECE_BINS
from lympho_mil.evaluation.external_plots import PLOT_CAPTIONS


@dataclass(frozen=True)
class Section:
    """One table of the report: a title, a sentence on how to read it, plain-text cells."""

    title: str
    note: str
    header: list[str]
    rows: list[list[str]]


LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "auroc": "AUROC",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "brier": "Brier score",
    "ece": f"expected calibration error ({ECE_BINS} bins)",
}


def _cell(summary: dict[str, float], number: str = "{:.3f}") -> str:
    """``estimate [low, high]`` formatted with ``number``."""
    low, high = (number.format(summary[k]) for k in ("ci95_low", "ci95_high"))
    return f"{number.format(summary['estimate'])} [{low}, {high}]"


def _patients(n: int) -> str:
    return f"{n} patient{'' if n == 1 else 's'}"


def report_summary(report: dict[str, Any]) -> list[str]:
    """The report's opening paragraphs (plain text): the cohort, the intervals, warnings."""
    boot = report["bootstrap"]
    unlabelled = report["n_unlabelled_left_out"]
    lines = [
        f"{report['n_patients']} labelled patients ({report['n_tumoral']} tumoral, "
        f"{report['n_reactive']} reactive)"
        + (f"; {unlabelled} without a label left out." if unlabelled else ".")
        + f" Cells: estimate [95% interval]; intervals from a {boot['method']}, "
        f"{boot['resamples']} resamples, seed {boot['seed']}.",
    ]
    if report["threshold_refitted"]:
        lines.append(
            "The decision thresholds were refitted on this cohort (not the models' own): "
            "the figures that depend on them are optimistic."
        )
    for name, entry in report["models"].items():
        if entry["n_in_sample"]:
            lines.append(
                f"{name} was trained on {entry['n_in_sample']} of these patients (marked in "
                "the patient table): its figures are optimistic."
            )
    return lines


def report_sections(report: dict[str, Any]) -> list[Section]:
    """The report's tables, as shown in ``evaluation.md`` and ``report.html``."""
    models = report["models"]
    sections = [
        Section(
            "Thresholds",
            "A patient is called tumoral when its probability is at or above the threshold.",
            ["model", "threshold", "where it came from", "patients it was trained on"],
            [
                [name, f"{e['threshold']:.3f}", e["threshold_source"], str(e["n_in_sample"])]
                for name, e in models.items()
            ],
        ),
        Section(
            "Metrics",
            "At each model's threshold; the AUROC, Brier score and calibration error do not "
            "depend on it.",
            ["metric", *models],
            [
                [LABELS[m], *(_cell(e["metrics"][m]) for e in models.values())]
                for m in COHORT_METRIC_NAMES
            ],
        ),
        Section(
            "Referral: who could skip flow cytometry",
            "For each sensitivity to keep, the operating threshold is the highest one that "
            "keeps at least that share of the tumoral patients at or above it, set on this "
            "cohort (and again on each resample, so the intervals include its choice). "
            "Patients below it could skip flow cytometry; tumoral missed: the tumoral patients "
            "among them.",
            [
                "model",
                "sensitivity kept",
                "threshold",
                "could skip flow cytometry",
                "sensitivity",
                "specificity",
                "tumoral missed",
            ],
            [
                [
                    name,
                    f">= {r['target_sensitivity']:.2f}",
                    _cell(r["threshold"]),
                    f"{_cell(r['skip_fraction'], '{:.1%}')} ({_patients(r['n_skip'])})",
                    _cell(r["sensitivity"]),
                    _cell(r["specificity"]),
                    str(r["n_tumoral_missed"]),
                ]
                for name, e in models.items()
                for r in e["referral"]
            ],
        ),
    ]
    differences = report["comparison"]["differences"]
    if differences:
        reference = report["comparison"]["reference"]
        compared = list(next(iter(differences.values())))
        sections.append(
            Section(
                f"Paired differences to {reference}",
                f"Each model minus {reference} on the same resamples of patients; an interval "
                "that excludes 0 is a difference beyond the bootstrap noise.",
                ["model", *(f"difference in {LABELS[m]}" for m in compared)],
                [
                    [name, *(_cell(d[m], "{:+.3f}") for m in compared)]
                    for name, d in differences.items()
                ],
            )
        )
    return sections


def markdown(report: dict[str, Any], sections: list[Section], figures: list[str]) -> str:
    """``evaluation.md``: the summary, the tables and links to the figures."""
    lines = ["# External validation"]
    for paragraph in report_summary(report):
        lines += ["", paragraph]
    for section in sections:
        lines += ["", f"## {section.title}", "", section.note, ""]
        lines += [f"| {' | '.join(section.header)} |", "|---" * len(section.header) + "|"]
        lines += [f"| {' | '.join(row)} |" for row in section.rows]
    if figures:
        lines += ["", "## Figures", "", *(f"![{name}]({name})" for name in figures)]
    return "\n".join(lines) + "\n"


# -- HTML -------------------------------------------------------------------------------------
STYLE = """
body { font: 15px system-ui, sans-serif; margin: 1.5em auto; max-width: 1240px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td { white-space: nowrap; }
th { background: #eef1f5; }
tr:nth-child(even) td { background: #fafafa; }
td.tumoral { color: #a11; } td.reactive { color: #246; }
td.wrong { font-weight: bold; background: #fde8e8 !important; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figure img { max-width: 540px; } figcaption { font-size: 0.85em; max-width: 540px; }
p.note { color: #555; max-width: 60em; }
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of already escaped cells (a cell may carry ``<td ...>`` itself)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _patient_table(report: dict[str, Any]) -> str:
    """Patients, the reference model's most suspicious first: label, then per model its
    probability (marked where the model was trained on the patient), decision, crops and
    montage link; a decision that disagrees with the label is highlighted."""
    names = list(report["models"])
    header = ["patient", "label"]
    for name in names:
        header += [f"{name}: probability", "decision", "crops", "montage"]
    rows = []
    for patient in report["patients"]:
        label = "tumoral" if patient["label"] == 1 else "reactive"
        row = [html.escape(patient["id"]), label]
        for name in names:
            p = patient["models"][name]
            wrong = " wrong" if p["decision"] != label else ""
            marker = " &dagger;" if p["in_sample"] else ""
            link = p["montage"]
            row += [
                f"{p['probability']:.3f}{marker}",
                f'<td class="{p["decision"]}{wrong}">{p["decision"]}</td>',
                str(p["n_instances"]),
                f'<a href="{html.escape(urllib.parse.quote(link))}">montage</a>' if link else "",
            ]
        rows.append(row)
    return _table([html.escape(h) for h in header], rows)


def render_html(
    report: dict[str, Any], sections: list[Section], figures: Mapping[str, bytes]
) -> str:
    """``report.html``: summary, tables, figures (embedded) and the per-patient table."""
    parts = [f"<p>{html.escape(line)}</p>" for line in report_summary(report)]
    for section in sections:
        parts += [
            f"<h2>{html.escape(section.title)}</h2>",
            f'<p class="note">{html.escape(section.note)}</p>',
            _table(
                [html.escape(h) for h in section.header],
                [[html.escape(c) for c in row] for row in section.rows],
            ),
        ]
    parts.append("<h2>Figures</h2>")
    if not figures:
        parts.append("<p>No figures: they need matplotlib (the <code>plots</code> extra).</p>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(PLOT_CAPTIONS[name])}</figcaption></figure>"
        )
    parts += [
        "<h2>Patients</h2>",
        '<p class="note">Most suspicious first (by the probability of the first model). '
        "&dagger;: a patient the model was trained on. Highlighted: a decision that "
        "disagrees with the label.</p>",
        _patient_table(report),
    ]
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>External validation</title>"
        f"<style>{STYLE}</style></head>\n<body>\n<h1>External validation</h1>\n{body}\n"
        "</body></html>\n"
    )
