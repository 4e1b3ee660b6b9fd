"""Tasks from files and from BIG-bench records (registry downloads: tests/hub/test_registry.py)."""

from __future__ import annotations

import gzip
import json

import pytest

from sigmatune.training import data
from sigmatune.training.data import Example, load_task
from sigmatune.training.settings import DEFAULT_DATA


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_csv_json_and_text_files(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    jsonl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task(jsonl, heldout=2, seed=0)
    assert (len(task.train), len(task.heldout)) == (8, 2)
    assert {e.prompt for e in task.train + task.heldout} == {f"q{i}" for i in range(10)}
    assert task.instruction is None
    csv = write(tmp_path / "d.csv", "input,target\nhello,world\nfoo,bar\n")
    assert load_task(csv, heldout=1).train + load_task(csv, heldout=1).heldout != []
    listed = write(
        tmp_path / "d.json", json.dumps({"examples": [{"prompt": "p", "answers": ["x", "y"]}] * 3})
    )
    assert load_task(listed, heldout=1).train[0] == Example("p", ["x", "y"])
    text = write(tmp_path / "d.txt", "first paragraph\n\nsecond one\n\n\nthird")
    task = load_task(text, heldout=1)
    assert sorted(e.answers[0] for e in task.train + task.heldout) == [
        "first paragraph",
        "second one",
        "third",
    ]
    assert all(e.prompt is None for e in task.train)


def test_split_is_seeded_and_disjoint(tmp_path):
    jsonl = write(
        tmp_path / "d.jsonl", "\n".join(json.dumps({"input": str(i), "output": "x"}) for i in range(50))
    )
    first, again, other = (
        load_task(jsonl, 10, seed=3),
        load_task(jsonl, 10, seed=3),
        load_task(jsonl, 10, seed=4),
    )
    assert [e.prompt for e in first.heldout] == [e.prompt for e in again.heldout]
    assert [e.prompt for e in first.heldout] != [e.prompt for e in other.heldout]
    assert not {e.prompt for e in first.heldout} & {e.prompt for e in first.train}


def test_a_group_stays_on_one_side_of_the_split(tmp_path):
    records = [{"input": f"{i}", "output": "x", "group": f"doc{i // 7}"} for i in range(70)]  # 10 groups of 7
    records += [{"input": f"alone{i}", "output": "y"} for i in range(5)]  # no group: one of its own each
    task = load_task(write(tmp_path / "g.jsonl", "\n".join(json.dumps(r) for r in records)), 10, seed=1)
    held, train = {e.group for e in task.heldout}, {e.group for e in task.train}
    assert not (held - {None}) & (train - {None})  # no group on both sides
    assert 10 <= len(task.heldout) < 10 + 7 and len(task.heldout) + len(task.train) == 75
    assert [e.group for e in load_task(str(tmp_path / "g.jsonl"), 10, seed=1).heldout] == [
        e.group for e in task.heldout
    ]  # seeded
    one = write(tmp_path / "one.jsonl", "\n".join(json.dumps({**r, "group": "all"}) for r in records[:20]))
    with pytest.raises(ValueError, match="holding out whole groups left nothing to train on"):
        load_task(one, 4)
    ungrouped = [Example(str(i), ["x"]) for i in range(50)]  # no groups: the plain seeded shuffle, as before
    train, held = data.held_out_split(ungrouped, 10, seed=3)
    order = list(range(50))
    data.random.Random(3).shuffle(order)
    assert [e.prompt for e in held] == [str(i) for i in order[:10]]
    assert [e.prompt for e in train] == [str(i) for i in order[10:]]


def test_an_example_that_draws_on_a_held_out_group_is_on_neither_side(tmp_path):
    """An analogy "a:b :: c:?" belongs to its (c, d) pair and shows the (a, b) pair: while (a, b) is held out it is
    not trained on (it would show a held-out answer), nor held out (its own pair is trained on)."""
    pairs = [f"p{k}" for k in range(20)]
    records = [
        {"input": f"{a} : {c}", "output": "x", "group": c, "draws_on": [a]}
        for c in pairs
        for a in pairs
        if a != c
    ]
    task = load_task(write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in records)), 40, seed=0)
    held = {e.group for e in task.heldout}
    assert held and not held & {e.group for e in task.train}
    assert all(not held & set(e.draws_on) for e in task.train)  # no held-out pair shown in training
    assert len(task.train) == (20 - len(held)) * (20 - len(held) - 1)  # the bridging ones on neither side
    assert data._user_example(tmp_path, 1, {**records[0], "draws_on": "p9"}).draws_on == (
        "p9",
    )  # one: a string


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.jsonl", '{"input": "a", "output": "b"}\n{oops', r"bad\.jsonl:2: not valid JSON"),
        ("keys.jsonl", '{"foo": 1}\n{"foo": 2}', r"record 1 has keys \['foo'\]; give a prompt"),
        ("d.parquet", "x", "unknown data format '.parquet'"),
        ("one.jsonl", '{"input": "a", "output": "b"}', "needs at least 2 examples"),
        ("list.json", '{"rows": []}', "expected a JSON list of records"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        load_task(write(tmp_path / name, text))
    with pytest.raises(ValueError, match="no such data file"):
        load_task(str(tmp_path / "missing.jsonl"))


def test_bigbench_records_become_examples():
    assert data._bigbench_example({"input": "The capital of France is", "target": ["Paris"]}).answers == [
        "Paris"
    ]
    choice = data._bigbench_example({"input": "Is it?", "target_scores": {"yes": 0, "no": 1}})
    assert choice == Example("Is it?\nOptions: yes; no", ["no"])


def test_the_default_task_is_shipped_whole_and_checked(tmp_path, monkeypatch, isolated_cache):
    task = load_task(DEFAULT_DATA, heldout=200, seed=0)  # no download: the cache folder is empty
    assert (len(task.train), len(task.heldout)) == (20242, 200)
    assert task.heldout[0] == Example("The capital of Connecticut is", ["Hartford"])  # the split of before
    assert "Apache-2.0" in task.source and not any(isolated_cache.parent.rglob("*.tar.gz"))
    damaged = gzip.compress(gzip.decompress((data.BUNDLED / "qa_wikidata.json.gz").read_bytes()) + b" ")
    (tmp_path / "qa_wikidata.json.gz").write_bytes(damaged)
    monkeypatch.setattr(data, "BUNDLED", tmp_path)
    with pytest.raises(RuntimeError, match="damaged; reinstall"):
        load_task(DEFAULT_DATA)
