"""The adapter commands on what a user or an attacker gives them: `eval` reuses the base model's kept
score, a bad training_summary.json is a clear error, `compress` checks its rank before loading a model
(issue 38)."""

from __future__ import annotations

from sigmatune.cli import main
from sigmatune.training.job import train
from tests.training import test_train
from tests.training.test_train import settings

workspace = test_train.workspace  # the fixture: a tiny chat model and a task file
EARLIER = "the base model's score of an earlier run"


def trained(workspace, out) -> dict:
    """Train a small adapter (rank 4) into out; its summary."""
    return train(settings(workspace, out, steps=3, rank=4, heldout=20, eval_accuracy=4))


# ---- eval and the base model's kept score --------------------------------------------------------------


def test_eval_reuses_the_base_score_the_train_job_kept(workspace, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    summary = trained(workspace, adapter)
    capsys.readouterr()
    assert main(["eval", str(adapter)]) == 0
    captured = capsys.readouterr()
    assert EARLIER in captured.err, captured.err
    assert f"base model: held-out loss {summary['before']['loss']:.4f}" in captured.out
    assert main(["eval", str(adapter), "--heldout", "10"]) == 0  # another split: scored, then kept
    assert EARLIER not in capsys.readouterr().err
    assert main(["eval", str(adapter), "--heldout", "10"]) == 0
    assert EARLIER in capsys.readouterr().err
