"""Progress of long steps: a few plain lines when the output is not a terminal."""

from __future__ import annotations

import pytest

from lympho_mil.progress import progress


def test_plain_lines_at_start_each_tenth_and_end(capsys: pytest.CaptureFixture[str]) -> None:
    with progress("decoding crops", 100) as bar:
        for _ in range(100):
            bar.update()
        bar.note("done")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "lympho-mil: decoding crops: 100 crops"
    assert len(lines) == 11  # the start, then every tenth
    assert lines[1].startswith("lympho-mil: decoding crops: 10/100 crops (")
    assert "s left" in lines[1]
    assert lines[-1].startswith("lympho-mil: decoding crops: 100/100 crops")


def test_a_note_is_shown_beside_the_count(capsys: pytest.CaptureFixture[str]) -> None:
    with progress("pretraining", 2, "epochs") as bar:
        bar.note("loss 4.2")
        bar.update()
        bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].endswith("left, loss 4.2)") and "1/2 epochs" in lines[1]


def test_log_level_warning_hides_progress_and_info_shows_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lympho_mil.progress import set_log_level

    try:
        set_log_level("warning")
        with progress("decoding crops", 10) as bar:
            bar.update(10)
        assert capsys.readouterr().err == ""
        set_log_level("info")
        with progress("decoding crops", 10) as bar:
            bar.update(10)
        assert "decoding crops: 10/10 crops" in capsys.readouterr().err
    finally:
        set_log_level("info")
    with pytest.raises(ValueError, match="log level"):
        set_log_level("loud")
