"""lr "auto" (training/lr_auto.py): a window of learning rates around the rule's, trained together for the whole
schedule on the training examples less a slice of unseen groups, the rule's kept unless another's loss on the slice
is clearly lower (then the lowest), then the
adapter trained at it on the whole split — in fp64 the run an explicit lr makes; the held-out split is never
read to choose; a failing candidate drops out; a job resumed in either phase ends where an uninterrupted one
does."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import sigmatune.training.together_loop as together_loop
from sigmatune import SigmaConfig, get_sigma_model, read_adapter
from sigmatune.formats.checkpoint import CHECKPOINT_NAME
from sigmatune.formats.files import AdapterFileError
from sigmatune.training import loop, lr_auto
from sigmatune.training.data import Example, Task, load_task
from sigmatune.training.job import train
from sigmatune.training.scores import score
from sigmatune.training.settings import TrainSettings, auto_lr
from tests.training.test_together import chat, crash_at_call  # noqa: F401 (a fixture)
from tests.training.test_train import failing_loss, settings, workspace  # noqa: F401 (a fixture)

DIAGONAL = SigmaConfig(rank=6, svd="exact")
CPU = torch.device("cpu")


def test_the_window_runs_from_a_third_to_ten_times_the_rules_lr():
    assert lr_auto.candidates(1e-2) == [3e-3, 1e-2, 3e-2, 0.1]
    assert lr_auto.candidates(3e-3) == [1e-3, 3e-3, 1e-2, 3e-2]
    assert lr_auto.candidates(3e-4) == [1e-4, 3e-4, 1e-3, 3e-3]
    assert lr_auto.candidates(3.0) == [1.0, 3.0]  # none of 10 or more (settings refuse them)


def test_the_rules_lr_stands_unless_another_is_clearly_lower_on_the_slice():
    margin = lr_auto.MARGIN
    near = {1e-3: 0.50, 3e-3: 0.50 * (1 + margin) * 0.999, 1e-2: 0.9, 3e-2: None}
    assert lr_auto.decide(near, 3e-3) == 3e-3  # within MARGIN of the lowest: the centre
    clear = {**near, 3e-3: 0.50 * (1 + margin) * 1.001}
    assert lr_auto.decide(clear, 3e-3) == 1e-3  # more than MARGIN above it: the lowest
    assert lr_auto.decide({**clear, 3e-3: None}, 3e-3) == 1e-3  # the centre failed: the lowest
    assert lr_auto.decide({**clear, 3e-3: math.inf}, 3e-3) == 1e-3
    with pytest.raises(FloatingPointError, match="every learning rate tried failed"):
        lr_auto.decide(dict.fromkeys(near), 3e-3)


def test_the_slice_is_a_few_examples_of_many_groups_none_of_them_trained_on():
    assert lr_auto.slice_split(list(range(63))) is None  # too few to spare a slice
    rest, part = lr_auto.slice_split(list(range(100)))  # no groups: the last examples
    assert (rest, part) == (list(range(84)), list(range(84, 100)))
    rest, part = lr_auto.slice_split(list(range(5000)))
    assert part == list(range(5000 - lr_auto.SLICE_MAX, 5000)) and rest + part == list(range(5000))
    examples = [Example(str(i), ["x"], f"pair{i // 9}") for i in range(2000)]  # groups of 9
    rest, part = lr_auto.slice_split(examples)
    held = {e.group for e in part}
    assert not held & {e.group for e in rest}  # no group on both sides
    assert len(held) >= 20 and all(sum(e.group == g for e in part) <= lr_auto.PER_GROUP for g in held)
    aside = 2000 - len(rest)  # whole groups, SET_ASIDE_SHARE of the examples (and part of one group more)
    assert aside == sum(e.group in held for e in examples) and 200 <= aside < 200 + 9
    assert [e.prompt for e in rest] == [str(i) for i in range(2000) if f"pair{i // 9}" not in held]
    shown = [Example(str(i), ["x"], f"pair{i // 9}", (f"pair{(i * 7) % 222}",)) for i in range(2000)]
    rest, part = lr_auto.slice_split(shown)  # each also shows another pair (an exemplar): none set aside
    held = {e.group for e in part}
    assert rest and all(e.group not in held and not held & set(e.draws_on) for e in rest)
    assert len(rest) == sum(e.group not in held and e.draws_on[0] not in held for e in shown)
    big_last = [Example(str(i), ["x"], "big" if i >= 50 else None) for i in range(300)]
    assert lr_auto.slice_split(big_last) is None  # the slice's one group: most of the examples
    few = [
        Example(str(i), ["x"], f"g{i // 40}") for i in range(400)
    ]  # 10 groups of 40: 4 scored, 40 set aside
    assert lr_auto.slice_split(few) is None  # fewer than SLICE_MIN scored: no slice worth its noise


def auto_run(chat, task: Task, steps=6, **options):  # noqa: F811
    """fit_auto on a fresh fp64 model: (the Choice, the active adapter's vectors, the model)."""
    _, base, tokenizer = chat
    model = get_sigma_model(base, DIAGONAL)
    run = TrainSettings(batch_size=4, steps=steps, warmup=0.2, save_every=0, packing=False, lr="auto")
    try:
        choice = lr_auto.fit_auto(model, tokenizer, task, dataclasses.replace(run, **options), CPU)
    except BaseException:
        model.unload()  # the base model is the module's: left as it was
        raise
    return choice, vectors(model), model


def vectors(model) -> dict[str, torch.Tensor]:
    return {
        n: layer.sigma_adapters["default"].vector.detach().clone()
        for n, layer in model.spectral_layers().items()
    }


def test_lr_auto_chooses_on_the_slice_alone_then_is_the_run_at_its_lr(chat):  # noqa: F811
    folder, base, tokenizer = chat
    task = load_task(str(folder / "parity.jsonl"), heldout=10, seed=0)
    unread = dataclasses.replace(task, heldout=[])  # choosing may not score on it: there is nothing there
    choice, kept, model = auto_run(chat, unread)
    model.unload()
    centre = auto_lr("diagonal", 0, base.config.num_hidden_layers)
    assert list(choice.losses) == lr_auto.candidates(centre) and all(choice.losses.values())
    assert choice.lr == lr_auto.decide(choice.losses, centre) and len(choice.history) == 6
    rest, part = lr_auto.slice_split(task.train)
    assert (choice.slice, choice.set_aside) == (len(part), len(task.train) - len(rest))
    alone = TrainSettings(batch_size=4, steps=6, warmup=0.2, save_every=0, packing=False, lr=choice.lr)
    candidate = get_sigma_model(base, DIAGONAL)  # the kept lr's candidate, alone: its loss on the slice
    on_slice = dataclasses.replace(task, train=rest, heldout=part)
    loop.fit(candidate, tokenizer, on_slice, alone, CPU, packed=False)
    scoring = dataclasses.replace(alone, heldout=len(part), eval_accuracy=0)
    assert score(candidate, tokenizer, on_slice, scoring, CPU).loss == pytest.approx(
        choice.losses[choice.lr], abs=2e-4
    )
    candidate.unload()
    final = get_sigma_model(
        base, DIAGONAL
    )  # the job's adapter: the run at the kept lr on all the training split
    history = loop.fit(final, tokenizer, task, alone, CPU, packed=False)
    for layer, vector in vectors(final).items():
        torch.testing.assert_close(kept[layer], vector, rtol=1e-9, atol=1e-11)
    assert history == choice.history and float(max(v.abs().max() for v in kept.values())) > 1e-3
    final.unload()


def test_a_failing_candidate_drops_out_and_all_failing_is_an_error(chat, monkeypatch):  # noqa: F811
    folder = chat[0]
    task = load_task(str(folder / "parity.jsonl"), heldout=10, seed=0)
    real = together_loop._backward
    failing = {3}

    def broken(model, tokenizer, members, orders, encoded, active, step, *rest):
        losses = real(model, tokenizer, members, orders, encoded, active, step, *rest)
        return [math.nan if step == 2 and k in failing else loss for k, loss in enumerate(losses)]

    monkeypatch.setattr(together_loop, "_backward", broken)
    choice, _, model = auto_run(chat, task)
    highest = max(choice.losses)
    assert choice.losses[highest] is None and choice.lr != highest and choice.losses[choice.lr] is not None
    model.unload()
    failing.update(range(4))
    with pytest.raises(FloatingPointError, match="lr auto: every learning rate tried failed"):
        auto_run(chat, task)


def test_a_task_too_small_for_a_slice_trains_at_the_rules_lr(chat):  # noqa: F811
    folder, base, _ = chat
    task = load_task(str(folder / "parity.jsonl"), heldout=10, seed=0)
    small = dataclasses.replace(task, train=task.train[:40])
    choice, _, model = auto_run(chat, small)
    model.unload()
    centre = auto_lr("diagonal", 0, base.config.num_hidden_layers)
    assert (choice.lr, choice.losses, len(choice.history)) == (centre, {}, 6)


def test_the_job_records_the_choice_and_a_resumed_one_ends_where_a_straight_one_does(
    workspace,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    options = dict(lr="auto", steps=12, save_every=4, eval_accuracy=0, heldout=10, packing=False)
    straight = train(settings(workspace, tmp_path / "straight", **options))
    log = capsys.readouterr().err
    losses = {float(lr): loss for lr, loss in straight["lr_auto"]["losses"].items()}
    assert len(losses) == 4 and straight["chosen_lr"] == min(losses, key=losses.get)
    assert straight["settings"]["lr"] == "auto" and f"lr auto: {straight['chosen_lr']:g} kept" in log
    card = (tmp_path / "straight" / "README.md").read_text()
    assert f"at lr {straight['chosen_lr']} (chosen by lr auto)" in card
    out = tmp_path / "out"
    crash_at_call(monkeypatch, 6)  # after the checkpoint of step 4
    with pytest.raises(KeyboardInterrupt):
        train(settings(workspace, out, **options))
    monkeypatch.undo()
    assert (out / CHECKPOINT_NAME).exists()
    with pytest.raises(ValueError, match=r"lr 'auto' → 0.01"):  # not the run that wrote it
        train(settings(workspace, out, **{**options, "lr": 0.01}, resume=True))
    failing_loss(monkeypatch, at_call=10, how="crash")  # the last run's step 10: its checkpoint of step 8
    with pytest.raises(KeyboardInterrupt):
        train(settings(workspace, out, **options, resume=True))  # the choice resumed and made, then cut
    monkeypatch.undo()
    capsys.readouterr()
    resumed = train(settings(workspace, out, **options, resume=True))
    log = capsys.readouterr().err
    assert (
        "trained together" not in log and f"lr auto: {straight['chosen_lr']:g}, the lr the interrupted" in log
    )
    assert resumed["resumed_from_step"] == 8 and resumed["lr_auto"] == straight["lr_auto"]
    assert resumed["loss_history"] == straight["loss_history"] and not (out / CHECKPOINT_NAME).exists()
    for name, layer in read_adapter(tmp_path / "straight").layers.items():
        assert torch.equal(layer.vector, read_adapter(out).layers[name].vector)
    assert json.loads((out / "training_summary.json").read_text())["chosen_lr"] == straight["chosen_lr"]


def test_a_checkpoints_recorded_choice_is_checked_before_it_is_used(tmp_path):
    good = {
        "chosen_lr": 3e-3,
        "lr_auto": {"losses": {"0.001": 0.7, "0.003": 0.5, "0.01": None}, "slice": 16, "set_aside": 20},
    }
    choice = lr_auto._recorded_choice(tmp_path, good)
    assert (choice.lr, choice.losses, choice.slice) == (3e-3, {1e-3: 0.7, 3e-3: 0.5, 1e-2: None}, 16)
    for bad in ({**good, "chosen_lr": "3e-3"}, {**good, "chosen_lr": 50}, {**good, "lr_auto": {**good["lr_auto"], "losses": {"x": 1}}},
                {**good, "lr_auto": {**good["lr_auto"], "losses": {"0.1": "low"}}}, {**good, "lr_auto": []}):  # fmt: skip
        with pytest.raises(AdapterFileError, match="holds an lr auto choice that is not one lr auto writes"):
            lr_auto._recorded_choice(tmp_path, bad)
