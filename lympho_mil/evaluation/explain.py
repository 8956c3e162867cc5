"""Montages a clinician can look at: the crops that drove each patient's prediction.

For every patient, ``montages/<patient>.png`` shows the ``k`` crops with the highest score and
the ``k`` with the lowest, each captioned with its score, under a header with the patient's
probability and decision. The score is the crop's share of the decision (attention weight,
summing to 1 over the patient's crops) or, for models that classify every crop
(`InstanceMIL`), the crop's own probability.
``explanations.md`` gathers every montage of the predicted set on one page, the most
suspicious patients first.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from lympho_mil.data.dlmi import check_patient_id
from lympho_mil.data.errors import DataError
from lympho_mil.files import atomic_write_files

EXPLANATION_FILE = "explanations.md"
MONTAGE_DIR = "montages"
TILE = 96  # side of one crop in the montage, pixels
_PAD, _TEXT = 6, 16  # gap between tiles; height of one line of text
_HEADER = 2 * _TEXT + _PAD
_BACKGROUND, _INK, _EMPTY = (255, 255, 255), (20, 20, 20), (235, 235, 235)
_ROW_COLOURS = ((178, 34, 34), (70, 110, 160))  # frame of the top row, of the bottom row


def montage_size(top_k: int, tile: int = TILE, title_width: int = 0) -> tuple[int, int]:
    """``(width, height)`` in pixels of a montage of ``top_k`` crops per row, wide enough
    for a title of ``title_width`` pixels."""
    width = max(_PAD + top_k * (tile + _PAD), title_width + 2 * _PAD)
    height = _HEADER + 2 * (_TEXT + tile + _TEXT + _PAD)
    return width, height


class ExplainError(ValueError):
    """Explanations were asked of a model or data that cannot give them."""


def crop_scores(record: dict[str, Any]) -> tuple[list[float], str]:
    """The per-crop scores of a ``predict_step`` record and what they are.

    Crop probabilities where the model has them, else the crops' weights. Raises
    `ExplainError` for a model that gives neither (a clinical-only model reads no crop).
    """
    if record["instance_probability"] is not None:
        return list(record["instance_probability"]), "crop probability"
    if record["weights"] is not None:
        return list(record["weights"]), "share of the decision"
    raise ExplainError(
        f"patient {record['id']}: the model gives no per-crop score (weights or crop "
        "probabilities); explanations need a model that reads the crops"
    )


def rank_crops(scores: Sequence[float], top_k: int) -> tuple[list[int], list[int]]:
    """Indices of the ``top_k`` highest scores (highest first) and of the ``top_k`` lowest
    (lowest first), disjoint: a bag of fewer than ``2 * top_k`` crops fills the top row first.
    Among equal scores the top row takes the earlier crops, the bottom row lists the later
    crops first."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    top = order[:top_k]
    bottom = order[max(top_k, len(order) - top_k) :][::-1]
    return top, bottom


def render_montage(
    title: str,
    top: Sequence[tuple[Path, str]],
    bottom: Sequence[tuple[Path, str]],
    top_k: int,
    labels: tuple[str, str],
    tile: int = TILE,
) -> Image.Image:
    """An RGB image of `montage_size`: a title, then two captioned rows of crops.

    ``top`` and ``bottom`` hold ``(crop file, caption)`` pairs (at most ``top_k`` each);
    ``labels`` name the two rows. Empty slots stay grey. The image widens to fit the title.
    """
    font = ImageFont.load_default(size=12)
    title_width = math.ceil(font.getlength(title))
    image = Image.new("RGB", montage_size(top_k, tile, title_width), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((_PAD, _PAD // 2), title, fill=_INK, font=font)
    y = _HEADER
    for row, label, colour in zip((top, bottom), labels, _ROW_COLOURS, strict=True):
        draw.text((_PAD, y), label, fill=colour, font=font)
        y += _TEXT
        for slot in range(top_k):
            x = _PAD + slot * (tile + _PAD)
            if slot >= len(row):
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=_EMPTY)
                continue
            path, caption = row[slot]
            image.paste(_read_crop(path, tile), (x, y))
            draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=colour, width=2)
            draw.text((x, y + tile + 1), caption, fill=_INK, font=font)
        y += tile + _TEXT + _PAD
    return image


def _read_crop(path: Path, tile: int) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"patient {path.parent.name}: cannot read crop {path}: {exc}") from exc


def _format_score(score: float, kind: str) -> str:
    if kind == "crop probability":
        return f"p = {score:.2f}"
    return f"{score:.1%}" if score >= 0.0005 else "<0.1%"


def _verdict(record: dict[str, Any]) -> str:
    predicted = "tumoral" if record["probability"] >= record["threshold"] else "reactive"
    return f"{predicted} (p = {record['probability']:.3f}, threshold {record['threshold']:.2f})"


def _label(record: dict[str, Any]) -> str:
    return {1: "tumoral", 0: "reactive"}.get(record["label"], "unknown")


IN_SAMPLE = "in sample: the model trained or validated on this patient"


def _in_sample(record: dict[str, Any]) -> str:
    return "yes" if record.get("in_sample") else "no" if record.get("in_sample") is False else "?"


def write_explanations(
    records: Sequence[dict[str, Any]],
    instance_paths: Callable[[str], Sequence[Path]],
    output_dir: str | Path,
    top_k: int = 8,
    overwrite: bool = False,
    model_name: str = "model",
) -> Path:
    """Write ``montages/<patient>.png`` per patient and ``explanations.md``; return its path.

    Args:
        records: ``predict_step`` records (one per patient; repeats are dropped).
        instance_paths: patient id -> files of its crops (``instance_ids`` are their names),
            e.g. `lympho_mil.data.PatientBagDataModule.instance_paths`.
        output_dir: folder of the summary page; montages go to its ``montages/`` subfolder.
        top_k: crops per row (most and least scored).
        overwrite: replace existing files (otherwise an existing one raises).
        model_name: named on the summary page.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    output_dir = Path(output_dir)
    by_id = {r["id"]: r for r in records}
    rows = sorted(by_id.values(), key=lambda r: (-r["probability"], r["id"]))
    sections, kind = [], ""
    outputs: dict[str | Path, bytes | str] = {}
    for record in rows:
        pid = check_patient_id(record["id"], "the predicted patients")
        scores, kind = crop_scores(record)
        files = {p.name: p for p in instance_paths(pid)}
        captioned = [
            (files[name], f"{_format_score(score, kind)}  {Path(name).stem}")
            for name, score in zip(record["instance_ids"], scores, strict=True)
        ]
        top, bottom = rank_crops(scores, top_k)
        n = record["n_instances"]
        title = f"{pid}: {_verdict(record)}; label {_label(record)}; {n} crops"
        if record.get("in_sample"):
            title += f"; {IN_SAMPLE}"
        labels = (f"highest {kind}", f"lowest {kind}")
        if kind == "share of the decision":
            labels = (f"highest {kind} (uniform: {1 / n:.1%})", labels[1])
            if max(scores) - min(scores) <= 1e-6:  # mean pooling: nothing to rank
                labels = (f"equal shares ({1 / n:.1%}): first crops", "last crops")
        image = render_montage(
            title, [captioned[i] for i in top], [captioned[i] for i in bottom], top_k, labels
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        outputs[output_dir / MONTAGE_DIR / f"{pid}.png"] = buffer.getvalue()
        sections.append((record, f"{MONTAGE_DIR}/{pid}.png"))
    summary = output_dir / EXPLANATION_FILE
    outputs[summary] = _summary(sections, kind, top_k, model_name)
    atomic_write_files(outputs, overwrite)  # as one: a failure leaves no mix of two runs' files
    return summary


def _summary(
    sections: list[tuple[dict[str, Any], str]], kind: str, top_k: int, model_name: str
) -> str:
    """The Markdown summary page: a table of patients, then each montage."""
    lines = [
        "# Explanations",
        "",
        f"Model: `{model_name}`. For each patient, the {top_k} crops with the highest "
        f"{kind} (red) and the {top_k} with the lowest (blue). Patients are sorted by "
        "probability of tumoral lymphocytosis, highest first.",
        "",
        "| patient | probability | predicted | label | in sample | crops | montage |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for record, link in sections:
        predicted = int(record["probability"] >= record["threshold"])
        lines.append(
            f"| {record['id']} | {record['probability']:.3f} | {predicted} | "
            f"{_label(record)} | {_in_sample(record)} | {record['n_instances']} | "
            f"[{link}]({link}) |"
        )
    if any(record.get("in_sample") for record, _ in sections):
        lines += ["", f"In sample (yes): {IN_SAMPLE}; its prediction is not an estimate."]
    for record, link in sections:
        verdict = _verdict(record) + (f" ({IN_SAMPLE})" if record.get("in_sample") else "")
        lines += ["", f"## {record['id']}", "", verdict, "", f"![{record['id']}]({link})"]
    return "\n".join(lines) + "\n"
