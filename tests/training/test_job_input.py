"""What the training job does with settings and data that cannot work, or that it changes: a clear
message before any work, never a wrong cause or a poisoned cache (issue 38)."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from sigmatune.cli import main
from sigmatune.core.config import cache_root
from sigmatune.formats.adapter_file import WEIGHTS_NAME
from sigmatune.training.data import load_task
from sigmatune.training.evaluate import Score
from sigmatune.training.job import train
from sigmatune.training.score_cache import _path, cached_score, keep_score, score_key
from tests.training import test_train
from tests.training.test_train import cli_train, settings

workspace = test_train.workspace  # the fixture: a tiny chat model and a task file
LOCK_NAME = ".sigmatune-train.lock"  # in the output folder while a run trains into it
SOURCE = str(Path(__file__).resolve().parents[2] / "src")


def scores_kept() -> list:
    folder = cache_root() / "scores"
    return sorted(folder.iterdir()) if folder.is_dir() else []


# ---- 8. --max-length that leaves no answer token ---------------------------------------------------------


def test_a_max_length_that_leaves_no_answer_token_is_refused_up_front(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(cli_train(workspace, "--max-length", "1", "--steps", "2", "--output-dir", str(out))) == 1
    err = capsys.readouterr().err
    assert "--max-length" in err and "at least 2" in err and "answer token" in err, err
    assert "nan" not in err and "--lr" not in err, err  # not the wrong cause
    assert scores_kept() == [] and not (out / WEIGHTS_NAME).exists()  # nothing scored, nothing cached


def test_examples_with_nothing_to_learn_are_a_clear_error_not_a_nan(workspace, tmp_path, capsys):
    data = tmp_path / "empty-texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": ""}) for _ in range(20)))
    args = ["train", "--model", str(workspace / "model"), "--data", str(data), "--steps", "2"]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no answer token" in err and "nan" not in err and "--lr" not in err, err
    assert scores_kept() == []


def test_a_non_finite_score_is_never_kept_nor_reused(workspace, tmp_path, capsys):
    job = settings(workspace, tmp_path / "out", steps=2, eval_accuracy=0, heldout=10, max_length=64)
    key = score_key(job, torch.float32, torch.device("cpu"))
    keep_score(key, Score(loss=float("nan"), accuracy=None, examples=10))
    assert scores_kept() == [] and cached_score(key) is None
    _path(key).parent.mkdir(parents=True, exist_ok=True)
    poisoned = {"key": key, "score": {"loss": float("nan"), "accuracy": None, "examples": 10}}
    _path(key).write_text(json.dumps(poisoned))  # as an older sigmatune kept it
    assert cached_score(key) is None
    _path(key).write_text(json.dumps({"key": key, "score": {**poisoned["score"], "loss": 10**400}}))
    assert cached_score(key) is None
    summary = train(job)
    assert math.isfinite(summary["before"]["loss"]) and "an earlier run" not in capsys.readouterr().err
    assert math.isfinite(cached_score(key).loss)  # scored anew and kept in its place


# ---- two runs into one output folder ------------------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "shared"
    command = [sys.executable, "-u", "-m", "sigmatune", *cli_train(workspace, "--steps", "1000000")]
    command += ["--save-every", "0", "--eval-accuracy", "0", "--heldout", "10", "--output-dir", str(out)]
    first = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SOURCE}
    )
    try:
        for line in first.stderr:  # wait until it trains
            if line.startswith("before:"):
                break
        code = main(cli_train(workspace, "--steps", "2", "--eval-accuracy", "0", "--output-dir", str(out)))
        err = capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert code == 1 and str(out) in err and f"pid {first.pid}" in err and "--output-dir" in err, err
    assert not (out / WEIGHTS_NAME).exists()
    assert main(cli_train(workspace, "--steps", "2", "--eval-accuracy", "0", "--output-dir", str(out))) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the lock is gone


def test_the_lock_of_a_run_that_died_is_taken_over_with_a_note(workspace, tmp_path, capsys):
    out = tmp_path / "stale"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    out.mkdir()
    (out / LOCK_NAME).write_text(dead.stdout.strip())  # as a run killed by SIGKILL leaves it
    assert main(cli_train(workspace, "--steps", "2", "--eval-accuracy", "0", "--output-dir", str(out))) == 0
    err = capsys.readouterr().err
    assert f"pid {dead.stdout.strip()}" in err and "no longer runs" in err, err
    assert (out / WEIGHTS_NAME).exists() and not (out / LOCK_NAME).exists()


# ---- the held-out cap --------------------------------------------------------------------------------


def test_the_held_out_cap_is_said(workspace, capsys):
    task = load_task(str(workspace / "parity.jsonl"), heldout=200)
    assert len(task.heldout) == 30
    err = capsys.readouterr().err
    assert "--heldout 200" in err and "30 held out" in err and "a fifth of the 150 examples" in err, err
    load_task(str(workspace / "parity.jsonl"), heldout=30)  # as asked: nothing to say
    assert capsys.readouterr().err == ""


# ---- BIG-bench task names ----------------------------------------------------------------------------


@pytest.fixture
def no_registry(monkeypatch):
    """A package index that cannot be reached (a loopback port nothing listens on)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")


def test_an_unknown_bigbench_task_offline_is_said_to_be_unchecked(workspace, tmp_path, capsys, no_registry):
    args = ["train", "--model", str(workspace / "model"), "--data", "bigbench:unknown", "--steps", "1"]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "bigbench:unknown" in err and "cannot be checked offline" in err and "qa_wikidata" in err, err
    assert "benchmark_tasks" in err and "could not download" not in err and "Traceback" not in err, err


def test_an_unknown_bigbench_task_gets_the_names_near_it(no_registry):
    sdist = cache_root() / "downloads" / "bigbench-1.0.0.tar.gz"  # a (small) sdist already in the cache
    sdist.parent.mkdir(parents=True)
    with tarfile.open(sdist, "w:gz") as archive:
        for name in ("arithmetic", "anachronisms", "word_sorting"):
            record = json.dumps({"examples": [{"input": "1+1", "target": "2"}] * 3}).encode()
            member = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            member.size = len(record)
            archive.addfile(member, io.BytesIO(record))
    assert len(load_task("bigbench:arithmetic", heldout=1).train) == 2
    with pytest.raises(ValueError, match=r"no task 'aritmetic'.*did you mean arithmetic\? \(3 in"):
        load_task("bigbench:aritmetic")


@pytest.mark.parametrize("name", ["", "../../secrets", "qa wikidata", "a//b"])
def test_a_malformed_bigbench_name_is_refused_before_any_download(name, no_registry):
    with pytest.raises(ValueError, match=r"not a BIG-bench task name.*bigbench:qa_wikidata"):
        load_task(f"bigbench:{name}")
