"""`sigmatune train --lr a,b,c` (a sweep: the best of three adapters trained together is kept) and
`sigmatune train --manifest` (many adapters, each on its own data, in one job), on a tiny chat model."""

from __future__ import annotations

import json
import math

import pytest

import sigmatune.training.together_loop as together_loop
from sigmatune import SigmaModel, read_adapter
from sigmatune.cli import main
from sigmatune.hub.loading import load_model
from sigmatune.training.job import SUMMARY_NAME
from sigmatune.training.settings import auto_lr
from tests.models import save_tiny_chat_model
from tests.training.test_together import crash_at_call

PARITY = [{"input": f"Is {n} even?", "output": "yes" if n % 2 == 0 else "no"} for n in range(120)]
NEXT = [{"input": f"What follows {n}?", "output": str(n + 1)} for n in range(120)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("together_job")
    texts = [f"{r['input']} {r['output']}" for r in PARITY + NEXT] + ["system user assistant"]
    save_tiny_chat_model(folder / "model", texts)
    (folder / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in PARITY))
    (folder / "next.jsonl").write_text("\n".join(json.dumps(r) for r in NEXT))
    return folder


def train(workspace, out, *extra) -> dict:
    common = [
        "--model",
        str(workspace / "model"),
        "--data",
        str(workspace / "parity.jsonl"),
        "--rank",
        "full",
    ]
    common += ["--steps", "12", "--heldout", "20", "--eval-accuracy", "5", "--output-dir", str(out)]
    assert main(["train", *common, *extra]) in (0, None)
    return json.loads((out / SUMMARY_NAME).read_text())


def test_a_sweep_keeps_the_lr_with_the_lowest_heldout_loss(workspace, tmp_path, capsys):
    summary = train(workspace, tmp_path / "out", "--lr", "0.003,0.1,0.03")
    candidates = summary["candidates"]
    assert [c["settings"]["lr"] for c in candidates] == [0.003, 0.1, 0.03]
    assert all(len(c["loss_history"]) == 12 and c["failed"] is None for c in candidates)
    best = min(candidates, key=lambda c: c["after"]["loss"])
    assert summary["chosen_lr"] == best["settings"]["lr"] and summary["after"] == best["after"]
    assert summary["settings"]["lr"] == "0.003,0.1,0.03"
    assert len({c["after"]["loss"] for c in candidates}) == 3  # three different adapters
    assert "kept lr_" in capsys.readouterr().err
    model, _ = load_model(str(workspace / "model"))
    loaded = SigmaModel.from_pretrained(model, tmp_path / "out")  # the kept one, where the job puts one
    assert read_adapter(tmp_path / "out").config.rank == "full"
    assert any(
        float(layer.sigma_adapters["default"].vector.abs().max()) > 0
        for layer in loaded.spectral_layers().values()
    )


def test_a_manifest_trains_one_adapter_per_line_and_a_failing_one_stops_alone(
    workspace, tmp_path, monkeypatch
):
    lines = [
        {"name": "parity", "data": "parity.jsonl", "lr": 0.1},
        {"name": "next", "data": str(workspace / "next.jsonl"), "lr": 0.05, "steps": 8, "seed": 3},
        {"name": "broken", "data": "parity.jsonl", "lr": 0.1},
    ]
    manifest = workspace / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    real = together_loop._backward

    def broken_at_step_3(model, tokenizer, members, orders, encoded, active, step, *rest):
        losses = real(model, tokenizer, members, orders, encoded, active, step, *rest)
        return [math.nan if step == 3 and k == 2 else loss for k, loss in enumerate(losses)]

    monkeypatch.setattr(together_loop, "_backward", broken_at_step_3)
    out = tmp_path / "many"
    summary = train(workspace, out, "--manifest", str(manifest))
    adapters = summary["adapters"]
    assert [len(adapters[n]["loss_history"]) for n in ("parity", "next", "broken")] == [12, 8, 2]
    assert "adapter 'broken': the training loss became nan at step 3" in adapters["broken"]["failed"]
    assert adapters["broken"]["after"] is None and not (out / "broken").exists()
    for name, data in (("parity", "parity.jsonl"), ("next", "next.jsonl")):
        saved = json.loads((out / name / SUMMARY_NAME).read_text())
        assert saved["after"]["loss"] < saved["before"]["loss"] and saved["settings"]["data"].endswith(data)
        assert read_adapter(out / name).config.rank == "full"
    assert adapters["next"]["settings"]["seed"] == 3 and adapters["next"]["settings"]["steps"] == 8


def test_a_manifest_adapter_without_an_lr_trains_at_the_rules_lr(workspace, tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    lines = [{"name": "a", "data": str(workspace / "parity.jsonl")}, {"name": "b", "data": str(workspace / "next.jsonl"), "lr": 0.05}]  # fmt: skip
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    summary = train(workspace, tmp_path / "out", "--manifest", str(manifest), "--steps", "2")  # lr: "auto"
    blocks = json.loads((workspace / "model" / "config.json").read_text())["num_hidden_layers"]
    lrs = {name: adapter["settings"]["lr"] for name, adapter in summary["adapters"].items()}
    assert lrs == {"a": auto_lr("diagonal", 0, blocks), "b": 0.05} and summary["settings"]["lr"] == "auto"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"name": "a"}', "each line is"),
        ('{"name": "a.b", "data": "parity.jsonl"}', "must be unique, of letters"),
        ('{"name": "a", "data": "parity.jsonl", "rank": 4}', "cannot differ between adapters"),
        ('{"name": "a", "data": "parity.jsonl", "steps": 99}', "raise --steps"),
        ("not json", "not JSON"),
        ('{"name": "a", "data": "parity.jsonl", "warmup": "0.1"}', "warmup is '0.1', not a float"),
        ('{"name": "a", "data": "parity.jsonl", "seed": "3"}', "seed is '3', not a int"),
        ('{"name": "a", "data": "parity.jsonl", "lr": "0.1"}', "is not one learning rate"),
        ('{"name": "a", "data": 7}', "is not a file name"),
    ],
)
def test_a_bad_manifest_line_is_refused_by_name(workspace, tmp_path, capsys, line, message):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(line)
    assert main(["train", "--model", str(workspace / "model"), "--manifest", str(manifest), "--lr", "0.1",
                 "--steps", "12", "--output-dir", str(tmp_path / "o")]) == 1  # fmt: skip
    assert message in capsys.readouterr().err


def test_sweep_values_are_checked(tmp_path, capsys):
    for lrs, message in (("0.1,0.1", "at least two different"), ("0.1,x", "at least two different"),
                         ("0.001,0.0010000001", "first 6 digits")):  # fmt: skip
        assert main(["train", "--lr", lrs, "--output-dir", str(tmp_path)]) == 1
        assert message in capsys.readouterr().err


def test_a_manifest_job_resumes_only_with_the_same_adapters_and_settings(workspace, tmp_path, monkeypatch):
    manifest, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    lines = [
        {"name": "a", "data": str(workspace / "parity.jsonl"), "lr": 0.1},
        {"name": "b", "data": str(workspace / "next.jsonl")},
    ]
    write = lambda: manifest.write_text("\n".join(json.dumps(line) for line in lines))  # noqa: E731
    write()
    options = ["--manifest", str(manifest), "--save-every", "4", "--no-packing", "--lr", "0.05"]
    common = ["train", "--model", str(workspace / "model"), "--data", str(workspace / "parity.jsonl"), "--rank", "full", "--steps", "12", "--heldout", "20",
              "--eval-accuracy", "5", "--output-dir", str(out), *options]  # fmt: skip
    crash_at_call(monkeypatch, 6)
    assert main(common) == 130  # interrupted after the checkpoint of step 4
    monkeypatch.undo()
    lines[0]["lr"] = 0.001  # an edited manifest: refused
    write()
    assert main([*common, "--resume"]) == 1
    lines[0]["lr"] = 0.1
    write()
    summary = train(workspace, out, *options, "--resume")
    straight = train(workspace, tmp_path / "straight", *options)
    assert summary["resumed_from_step"] == 4
    assert {n: a["loss_history"] for n, a in summary["adapters"].items()} == {
        n: a["loss_history"] for n, a in straight["adapters"].items()
    }
