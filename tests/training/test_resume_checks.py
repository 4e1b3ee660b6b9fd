"""`train --resume` on a forged checkpoint (its checksum recomputed): the real job refuses it before it
trains or saves anything, with a message naming the file and the field, never a traceback."""

from __future__ import annotations

import shutil

import pytest
import torch

from sigmatune.cli import main
from sigmatune.formats.adapter_file import WEIGHTS_NAME
from sigmatune.formats.checkpoint import CHECKPOINT_NAME
from sigmatune.hub.loading import load_model
from sigmatune.model.sigma_model import get_sigma_model
from sigmatune.training.data import load_task
from sigmatune.training.evaluate import Score
from sigmatune.training.job import SUMMARY_NAME, train
from sigmatune.training.loop import fit
from tests.checkpoints import read_checkpoint, write_forged
from tests.training import test_train
from tests.training.test_train import cli_train, settings

workspace = test_train.workspace  # the fixture: a tiny chat model and a task file
OPTIONS = dict(steps=6, save_every=2, eval_accuracy=0, heldout=10, structure="diagonal", max_length=64)


@pytest.fixture(scope="module")
def interrupted(workspace, tmp_path_factory):
    """The output folder of a 6-step run that stopped after step 4: the loop's own checkpoint of step 4."""
    out = tmp_path_factory.mktemp("interrupted")
    job = settings(workspace, out, **OPTIONS)
    model, tokenizer = load_model(job.model, torch.float32, "cpu")
    task = load_task(job.data, job.heldout, job.seed)
    sigma = get_sigma_model(model, job.sigma_config())
    before = Score(loss=3.0, accuracy=None, examples=10)
    fit(sigma, tokenizer, task, job, "cpu", out / CHECKPOINT_NAME, before)  # checkpoints at steps 2 and 4
    return out


def forged(interrupted, tmp_path, edit) -> str:
    """A copy of the interrupted run's folder whose checkpoint has one edit; the folder's path."""
    out = tmp_path / "forged"
    shutil.copytree(interrupted, out)
    info, tensors = read_checkpoint(out / CHECKPOINT_NAME)
    edit(info, tensors)
    write_forged(out / CHECKPOINT_NAME, info, tensors)
    return str(out)


def resume_args(workspace, out: str) -> list[str]:
    options = ["--steps", "6", "--save-every", "2", "--eval-accuracy", "0", "--heldout", "10"]
    options += ["--structure", "diagonal", "--max-length", "64", "--rank", "full", "--lr", "0.1"]
    return cli_train(workspace, *options, "--output-dir", out, "--resume")


@pytest.mark.parametrize(
    "label, edit, field",
    [
        ("done already", lambda info, t: info.update(step=10**9), "'step'"),
        ("before the start", lambda info, t: info.update(step=-5), "'step'"),
        ("a step as text", lambda info, t: info.update(step="2"), "'step'"),
        ("a score before of a list", lambda info, t: info.update(before=[1, 2]), "'before'"),
        ("a score before of NaN", lambda info, t: info["before"].update(loss=float("nan")), "'before.loss'"),
        ("settings of a list", lambda info, t: info.update(settings=[1]), "'settings'"),
        ("a history of nulls", lambda info, t: info.update(history=[None] * 4), "'history'"),
        ("the rng as float", lambda info, t: t.update(rng=t["rng"].float()), "'rng'"),
    ],
)
def test_a_forged_checkpoint_is_refused_before_anything_runs(
    workspace, interrupted, tmp_path, capsys, label, edit, field
):
    out = forged(interrupted, tmp_path, edit)
    assert main(resume_args(workspace, out)) == 1, label
    captured = capsys.readouterr()
    err = captured.err
    assert f"{out}/{CHECKPOINT_NAME}" in err and field in err and "delete it" in err, err
    assert "Traceback" not in err and "trained" not in captured.out, err
    assert (
        not (tmp_path / "forged" / WEIGHTS_NAME).exists()
        and not (tmp_path / "forged" / SUMMARY_NAME).exists()
    )


def test_the_interrupted_run_itself_resumes(workspace, interrupted, tmp_path):
    out = forged(interrupted, tmp_path, lambda info, t: None)
    summary = train(settings(workspace, out, **OPTIONS, resume=True))
    assert summary["resumed_from_step"] == 4 and len(summary["loss_history"]) == 6
    assert summary["before"]["loss"] == 3.0  # as the checkpoint recorded it: not scored again


def test_a_checkpoint_without_a_score_before_is_scored_anew(workspace, interrupted, tmp_path):
    out = forged(interrupted, tmp_path, lambda info, t: info.update(before={}))  # as fit() writes without one
    summary = train(settings(workspace, out, **OPTIONS, resume=True))
    assert summary["resumed_from_step"] == 4 and summary["before"]["loss"] != 3.0
    assert summary["before"]["examples"] == 10
