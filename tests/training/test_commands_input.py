"""The adapter commands on what a user or an attacker gives them: `eval` reuses the base model's kept
score, a bad training_summary.json is a clear error, `compress` checks its rank before loading a model
(issue 38)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sigmatune.cli import main
from sigmatune.commands import recorded_settings, training_summary
from sigmatune.training.job import SUMMARY_NAME, train
from tests.training import test_train
from tests.training.test_train import settings

workspace = test_train.workspace  # the fixture: a tiny chat model and a task file
SOURCE = str(Path(__file__).resolve().parents[2] / "src")
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
        ("seed beyond 64 bits", {"settings": {**GOOD["settings"], "seed": 10**400}}, "settings.seed"),
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


# ---- compress --rank ---------------------------------------------------------------------------------------


def sigmatune(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SOURCE}
    return subprocess.run(
        [sys.executable, "-m", "sigmatune", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def orphan(workspace, tmp_path):
    """A rank-4 adapter whose base model folder is gone: a command that loads the model fails on that."""
    shutil.copytree(workspace / "model", tmp_path / "model")
    train(
        settings(
            workspace, tmp_path / "adapter", model=str(tmp_path / "model"), steps=2, rank=4, eval_accuracy=0
        )
    )
    shutil.rmtree(tmp_path / "model")
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    "rank, message",
    [
        ("0", "--rank must be a whole number ≥ 1"),
        ("-3", "--rank must be a whole number ≥ 1"),
        ("4", "--rank 4 keeps every direction of"),
        ("1000000", "--rank 1000000 keeps every direction of"),
    ],
)
def test_compress_checks_its_rank_before_loading_the_model(orphan, tmp_path, rank, message):
    done = sigmatune("compress", str(orphan), str(tmp_path / "small"), "--rank", rank)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "no model at" not in done.stderr and not (tmp_path / "small").exists()
    if rank not in ("0", "-3"):
        assert "at most 4 directions" in done.stderr and "below 4" in done.stderr, done.stderr


def test_compress_refuses_a_rank_that_is_no_number_at_parse_time(tmp_path):
    done = sigmatune("compress", str(tmp_path / "a"), str(tmp_path / "b"), "--rank", "four")
    assert done.returncode == 2 and "--rank: invalid int value: 'four'" in done.stderr, done.stderr
