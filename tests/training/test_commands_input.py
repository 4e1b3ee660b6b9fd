"""The adapter commands on what a user or an attacker gives them: `eval` reuses the base model's kept
score, a bad training_summary.json is a clear error, `compress` checks its rank before loading a model
(issue 38)."""

from __future__ import annotations

import json

import pytest

from sigmatune.cli import main
from sigmatune.commands import recorded_settings, training_summary
from sigmatune.training.job import SUMMARY_NAME, train
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


# ---- a bad training_summary.json ------------------------------------------------------------------------


GOOD = {"settings": {"model": "smollm2", "data": "bigbench:qa_wikidata", "rank": 4, "lr": 0.01, "steps": 10}}


@pytest.mark.parametrize(
    "label, summary, field",
    [
        ("settings a list", {"settings": [1, 2]}, "settings"),
        ("settings text", {"settings": "rank=4"}, "settings"),
        ("model a number", {"settings": {**GOOD["settings"], "model": 5}}, "settings.model"),
        ("data null", {"settings": {**GOOD["settings"], "data": None}}, "settings.data"),
        ("steps as text", {"settings": {**GOOD["settings"], "steps": "150"}}, "settings.steps"),
        ("steps negative", {"settings": {**GOOD["settings"], "steps": -1}}, "steps"),
        ("heldout a float", {"settings": {**GOOD["settings"], "heldout": 2.5}}, "settings.heldout"),
        ("max_length a bool", {"settings": {**GOOD["settings"], "max_length": True}}, "settings.max_length"),
        ("packing a number", {"settings": {**GOOD["settings"], "packing": 1}}, "settings.packing"),
        ("lr a list", {"settings": {**GOOD["settings"], "lr": [0.1]}}, "settings.lr"),
        ("lr as words", {"settings": {**GOOD["settings"], "lr": "fast"}}, "lr"),
        ("rank an object", {"settings": {**GOOD["settings"], "rank": {"r": 4}}}, "settings.rank"),
        ("seed NaN", {"settings": {**GOOD["settings"], "seed": float("nan")}}, "settings.seed"),
        ("task a list", {**GOOD, "task": ["qa"]}, "task"),
        ("instruction a number", {**GOOD, "task": {"instruction": 7}}, "task.instruction"),
        ("a JSON list", [1, 2], "object"),
        ("nested 100,000 deep", "[" * 100_000 + "]" * 100_000, "nested"),
        ("17 MiB", " " * (17 * 2**20) + "{}", "MiB"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_bad_training_summary_is_a_clear_error(tmp_path, capsys, command, label, summary, field):
    folder = tmp_path / "adapter"
    folder.mkdir()
    text = summary if isinstance(summary, str) else json.dumps(summary)
    (folder / SUMMARY_NAME).write_text(text)
    args = [command, str(folder)] + (["hello"] if command == "generate" else [])
    assert main(args) == 1, label
    err = capsys.readouterr().err
    assert str(folder / SUMMARY_NAME) in err and field in err and "Traceback" not in err, err


def test_fields_of_no_setting_are_ignored(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    summary = {**GOOD, "settings": {**GOOD["settings"], "evil": [1]}, "loss_history": "not read"}
    (folder / SUMMARY_NAME).write_text(json.dumps(summary))
    assert recorded_settings(folder).rank == 4 and training_summary(folder)["loss_history"] == "not read"
