"""lr "auto": the probe's choice among the rule's lr and its neighbours (training/lr_probe.py), and the job that
runs it first on a tiny chat model: the adapter it saves is the one an explicit run at the chosen lr saves."""

from __future__ import annotations

import pytest
import torch

from sigmatune import read_adapter
from sigmatune.formats.checkpoint import CHECKPOINT_NAME
from sigmatune.training import lr_probe
from sigmatune.training.data import Example
from sigmatune.training.job import train
from tests.training.test_train import failing_loss, settings, workspace  # noqa: F401 (a fixture)


def probe_of(losses: dict[float, float | None]):
    """choose_lr around 1e-2 with these losses (an lr not listed: loss 1.0), and the lrs it asked for."""
    asked = []

    def trial(lrs):
        asked.append(lrs)
        return {lr: losses.get(lr, 1.0) for lr in lrs}

    return lr_probe.choose_lr(1e-2, trial), asked


def test_the_probe_keeps_the_lowest_loss_and_looks_once_past_an_edge():
    probe, asked = probe_of({3e-3: 0.9, 1e-2: 0.5, 3e-2: 0.7})
    assert probe.lr == 1e-2 and asked == [[3e-3, 1e-2, 3e-2]]  # inside: no more trials
    probe, asked = probe_of({3e-3: 0.9, 1e-2: 0.7, 3e-2: 0.5, 0.1: 0.4})
    assert probe.lr == 0.1 and asked[1:] == [[0.1]]  # past the upper edge, once (0.3 is not tried)
    probe, asked = probe_of({3e-3: 0.4, 1e-2: 0.7, 3e-2: 0.9, 1e-3: 0.6})
    assert probe.lr == 3e-3 and asked[1:] == [[1e-3]] and probe.losses[1e-3] == 0.6
    probe, asked = probe_of({3e-3: 0.9, 1e-2: 0.5, 3e-2: None})  # the edge diverged: the best is inside
    assert probe.lr == 1e-2 and len(asked) == 1 and probe.losses[3e-2] is None
    probe, asked = probe_of({3e-3: 0.9, 1e-2: 0.505, 3e-2: 0.5})  # within 2% of the lowest: the smaller lr
    assert probe.lr == 1e-2 and len(asked) == 1
    with pytest.raises(FloatingPointError, match=r"every learning rate probed diverged \(0.003, 0.01, 0.03"):
        probe_of({3e-3: None, 1e-2: None, 3e-2: None, 1e-3: None})


def test_the_probe_scores_on_a_slice_it_never_trains_on():
    assert lr_probe.probe_split(list(range(63))) is None  # too few to spare a slice
    rest, held = lr_probe.probe_split(list(range(100)))
    assert (len(rest), len(held)) == (84, 16) and not set(rest) & set(held)
    rest, held = lr_probe.probe_split(list(range(5000)))
    assert len(held) == lr_probe.SLICE_MAX and rest + held == list(range(5000))
    examples = [
        Example(str(i), ["x"], f"pair{i // 9}") for i in range(300)
    ]  # groups of 9: the slice whole ones
    rest, held = lr_probe.probe_split(examples)
    assert not {e.group for e in rest} & {e.group for e in held}  # a slice that shares no group
    assert 30 <= len(held) < 30 + 9 and [e.prompt for e in rest + held] == [str(i) for i in range(300)]
    big_last = [Example(str(i), ["x"], "big" if i >= 50 else None) for i in range(300)]
    assert lr_probe.probe_split(big_last) is None  # the slice would be the big group, most of the examples


def test_lr_auto_probes_then_trains_as_an_explicit_run_at_the_lr_it_chose(workspace, tmp_path, capsys):  # noqa: F811
    auto = train(settings(workspace, tmp_path / "auto", lr="auto", steps=12, eval_accuracy=0))
    log = capsys.readouterr().err
    probed = {float(lr): loss for lr, loss in auto["lr_probe"].items()}
    chosen = auto["settings"]["lr"]
    lowest = min(loss for loss in probed.values() if loss is not None)
    assert len(probed) >= 3 and chosen == min(
        lr for lr, loss in probed.items() if loss and loss <= 1.02 * lowest
    )
    assert f"lr auto: {chosen:g} (the smallest lr within 2% of the lowest probe loss)" in log
    explicit = train(settings(workspace, tmp_path / "explicit", lr=chosen, steps=12, eval_accuracy=0))
    assert explicit["lr_probe"] is None and auto["loss_history"] == explicit["loss_history"]
    for name, layer in read_adapter(tmp_path / "explicit").layers.items():
        assert torch.equal(layer.vector, read_adapter(tmp_path / "auto").layers[name].vector)


def test_a_resumed_lr_auto_run_keeps_its_checkpoints_lr(workspace, tmp_path, monkeypatch, capsys):  # noqa: F811
    options = dict(lr="auto", steps=12, save_every=4, eval_accuracy=0, heldout=10)
    straight = train(settings(workspace, tmp_path / "straight", **options))
    out = tmp_path / "out"
    failing_loss(monkeypatch, at_call=10, how="crash")  # the main loop's 10th step (the probe has its own)
    with pytest.raises(KeyboardInterrupt):
        train(settings(workspace, out, **options))
    monkeypatch.undo()
    assert (out / CHECKPOINT_NAME).exists()
    capsys.readouterr()
    resumed = train(settings(workspace, out, **options, resume=True))
    log = capsys.readouterr().err
    assert "probing" not in log  # not probed again: the checkpoint's lr
    assert f"lr {straight['settings']['lr']:g}: the lr auto's probe chose for the run being resumed" in log
    assert resumed["settings"]["lr"] == straight["settings"]["lr"]
    assert resumed["loss_history"] == straight["loss_history"]
