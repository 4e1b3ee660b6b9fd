"""Progress without a terminal (here stderr is pytest's capture, not a tty): plain lines now and then for
long work, none for short work."""

from __future__ import annotations

import re
import time

import pytest

from sigmatune.core import progress
from sigmatune.core.progress import Progress


@pytest.fixture
def every():
    """report_every for one test, the default restored after it."""
    previous = progress.report_every(progress.EVERY)
    yield progress.report_every
    progress.report_every(previous)


def test_short_work_prints_nothing(capsys):
    bar = Progress(100, "work", "steps")
    for _ in range(100):
        bar.update()
    bar.close()
    assert capsys.readouterr().err == ""


def test_long_work_prints_plain_lines_with_the_count_and_the_time_left(capsys, every):
    every(1)  # a line a tenth of the work, 0.1 s apart at least
    bar = Progress(10, "work", "steps")
    for step in range(10):
        time.sleep(0.12)
        bar.update()
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10, lines
    assert re.fullmatch(r"work: 1/10 steps \(10%\) after 0 s, ~\d+ s left", lines[0]), lines
    assert re.fullmatch(r"work: 10/10 steps \(100%\) after \d+ s, loss 0.111", lines[-1]), lines
    assert "\r" not in "".join(lines)  # no bar drawing


def test_lines_come_every_so_many_seconds_when_tenths_take_longer(capsys, every):
    every(0.2)
    bar = Progress(1000, "download", "B", unit_scale=True)
    for _ in range(3):
        time.sleep(0.25)
        bar.update(1)  # far from a tenth: the time alone brings a line
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert all(
        re.fullmatch(r"download: [123].00/1.00k B \(0%\) after \d+ s, ~\d+ s left", x) for x in lines
    ), lines


def test_hidden_progress_prints_nothing(capsys, every):
    every(0)
    bar = Progress(3, "quiet", show=False)
    for _ in range(3):
        bar.update()
    bar.close()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("seconds", [-1, float("nan")])
def test_a_negative_or_missing_interval_is_refused(seconds, every):
    with pytest.raises(ValueError, match="seconds ≥ 0"):
        every(seconds)
