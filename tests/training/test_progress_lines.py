"""Without a terminal (stderr a pipe, as in a log file or a scheduler), `sigmatune train` and `sigmatune
eval` still say how far they are in each long phase: SVD, scoring, training (issue 38)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.training import test_train
from tests.training.test_train import cli_train

workspace = test_train.workspace  # the fixture: a tiny chat model and a task file
SOURCE = str(Path(__file__).resolve().parents[2] / "src")


def sigmatune(*args: str) -> subprocess.CompletedProcess:
    """A real `python -m sigmatune` run whose stderr is a pipe; lines as often as the work allows."""
    env = {**os.environ, "PYTHONPATH": SOURCE}
    return subprocess.run(
        [sys.executable, "-m", "sigmatune", "--progress-seconds", "0", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_train_and_eval_print_progress_lines_without_a_terminal(workspace, tmp_path):
    out = str(tmp_path / "out")
    options = ["--steps", "4", "--heldout", "20", "--eval-accuracy", "4", "--batch-size", "4"]
    done = sigmatune(*cli_train(workspace, *options, "--output-dir", out))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    for phase in ("SVD: ", "held-out loss: ", "held-out accuracy: ", "train: "):
        assert any(line.startswith(phase) for line in lines), (phase, done.stderr[-3000:])
    assert "train: 4/4 steps (100%) after" in done.stderr and "loss " in done.stderr
    assert "\r" not in "".join(line for line in lines if line.startswith(("SVD", "held-out", "train")))
    done = sigmatune("eval", out, "--heldout", "20", "--eval-accuracy", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out loss: " in done.stderr and "held-out accuracy: " in done.stderr, done.stderr[-3000:]
