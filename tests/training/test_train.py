"""The main job end to end on a tiny chat model and a small task file, through the Python API and
the `sigmatune` command line (in process and as a real subprocess)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import sigmatune.training.job
import sigmatune.training.loop
import sigmatune.training.scores
from sigmatune import SigmaModel, read_adapter
from sigmatune.cli import main
from sigmatune.formats.adapter_file import WEIGHTS_NAME
from sigmatune.formats.checkpoint import CHECKPOINT_NAME
from sigmatune.formats.files import AdapterFileError
from sigmatune.hub.loading import load_model
from sigmatune.training.data import Example
from sigmatune.training.evaluate import normalize
from sigmatune.training.job import SUMMARY_NAME, train
from sigmatune.training.loop import batch_order, lr_factor
from sigmatune.training.settings import TrainSettings, auto_lr, one_three
from sigmatune.training.setup import model_blocks
from sigmatune.training.tokens import IGNORE, encode
from tests.models import save_tiny_chat_model, tiny_llama, tiny_tokenizer, vectors

PARITY = [{"input": f"Is {n} even?", "output": "yes" if n % 2 == 0 else "no"} for n in range(150)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny chat model folder and a task file of 150 yes/no questions."""
    folder = tmp_path_factory.mktemp("job")
    texts = [f"{r['input']} {r['output']}" for r in PARITY] + ["system user assistant"]
    save_tiny_chat_model(folder / "model", texts)
    (folder / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in PARITY))
    return folder


def settings(workspace, out, **overrides) -> TrainSettings:
    fields = dict(
        model=str(workspace / "model"),
        data=str(workspace / "parity.jsonl"),
        rank="full",
        lr=0.1,
        steps=30,
        batch_size=8,
        heldout=30,
        eval_accuracy=10,
        output_dir=str(out),
    )
    return TrainSettings(**{**fields, **overrides})


def cli_train(workspace, *extra: str) -> list[str]:
    """`sigmatune train` arguments for the tiny model and the parity task, plus extra ones."""
    return ["train", "--model", str(workspace / "model"), "--data", str(workspace / "parity.jsonl"), *extra]


def test_encode_puts_labels_on_the_answer_only():
    tokenizer = tiny_tokenizer(["Is 3 even? no", "system user assistant"])
    encoded = encode(tokenizer, "Be brief.", Example("Is 3 even?", ["no"]), max_length=64)
    taught = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(taught) == "no<|im_end|>\n"
    prefix = tokenizer.decode(encoded.input_ids[: len(encoded.input_ids) - len(taught)])
    assert (
        prefix
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs 3 even?<|im_end|>\n<|im_start|>assistant\n"
    )
    short = encode(tokenizer, None, Example("Is 3 even? " * 20, ["no"]), max_length=16)
    assert len(short.input_ids) == 16 and short.labels[-len(taught) :] == taught  # the prompt lost its start


def test_schedule_andbatch_order():
    s = TrainSettings(steps=100, warmup=0.1)
    factor = [lr_factor(step, s.steps, s.warmup) for step in range(100)]
    assert factor[0] == pytest.approx(0.1) and factor[9] == 1.0
    assert factor[55] == pytest.approx(0.5) and factor[99] < 0.01
    order = batch_order(10, 4, 5, seed=1)
    assert len(order) == 5 and all(len(b) == 4 for b in order)
    assert sorted(i for b in order[:2] for i in b) == sorted(
        set(i for b in order[:2] for i in b)
    )  # no repeats in an epoch
    assert order == batch_order(10, 4, 5, seed=1) != batch_order(10, 4, 5, seed=2)


def test_auto_settings_take_the_devices_recipe():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")

    def chosen(s: TrainSettings) -> tuple:
        return s.rank, s.structure, s.band, s.lr

    assert chosen(TrainSettings().on_device(cpu, 576)) == (128, "band", 1, "auto")  # lr: the job's (lr_auto)
    assert chosen(TrainSettings().on_device(gpu, 576)) == ("full", "diagonal", 0, "auto")
    assert chosen(TrainSettings().on_device(cpu, 64)) == ("full", "band", 1, "auto")  # a layer has < 128
    assert chosen(TrainSettings(rank=64).on_device(cpu, 576)) == (
        64,
        "diagonal",
        0,
        "auto",
    )  # the user's rank
    explicit = TrainSettings(lr=0.02, structure="band", band=2)
    assert chosen(explicit.on_device(cpu, 576)) == (128, "band", 2, 0.02)
    assert chosen(TrainSettings(band=2).on_device(gpu, 576)) == (
        "full",
        "band",
        2,
        "auto",
    )  # a band asked for
    assert chosen(TrainSettings(rank=64, structure="band", band=1).on_device(cpu, 576)) == (
        64,
        "band",
        1,
        "auto",
    )
    assert TrainSettings().on_device(cpu, 576).is_resolved() and not TrainSettings().is_resolved()
    with pytest.raises(ValueError, match="lr must be"):
        TrainSettings(lr="fast")


def test_lr_auto_divides_the_diagonals_lr_by_the_numbers_per_direction():
    """A band's 2b+1 numbers sum into each direction's update: lr auto is the diagonal's over 2b+1, on the
    1-3-10 series; the matrix structures keep their own."""
    lrs = {b: auto_lr("band", b) for b in (1, 2, 4, 16)}
    assert lrs == {1: 3e-3, 2: 3e-3, 4: 1e-3, 16: 3e-4}
    assert auto_lr("diagonal") == 1e-2 and auto_lr("band", 4) == one_three(1e-2 / 9) == 1e-3
    assert auto_lr("dense") == 3e-3
    assert [one_three(v) for v in (0.0026, 0.0095, 0.0011, 0.02)] == [3e-3, 1e-2, 1e-3, 3e-2]


def test_lr_auto_grows_as_the_model_gets_shallower():
    """A change per layer compounds over the blocks: lr auto scales by √(30 / blocks) — the best lrs the sweeps
    show on MiniLM (6 blocks) are 3× SmolLM2's (30) — and a model's depth comes from its config."""
    minilm = {b: auto_lr("band", b, blocks=6) for b in (1, 4, 16)}
    assert auto_lr("diagonal", blocks=6) == 3e-2 and minilm == {1: 1e-2, 4: 3e-3, 16: 1e-3}
    assert (
        auto_lr("diagonal", blocks=30) == auto_lr("diagonal") == 1e-2
        and auto_lr("diagonal", blocks=120) == 3e-3
    )
    assert auto_lr("dense", blocks=6) == 3e-3  # the matrix structures keep theirs
    with pytest.raises(ValueError, match="at least one block"):
        auto_lr("diagonal", blocks=0)
    tiny = tiny_llama()  # its config's depth
    assert model_blocks(tiny.config) == tiny.config.num_hidden_layers


def test_normalize_for_exact_match():
    assert normalize('  "Paris." ') == normalize("paris") == "paris"
    assert normalize("New   York!") == "new york"


def test_train_lowers_the_heldout_loss_and_saves_everything(workspace, tmp_path):
    summary = train(settings(workspace, tmp_path / "out"))
    assert summary["after"]["loss"] < 0.75 * summary["before"]["loss"], summary
    assert summary["after"]["accuracy"] >= summary["before"]["accuracy"]
    assert len(summary["loss_history"]) == 30
    saved = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert saved["after"] == summary["after"] and saved["settings"]["rank"] == "full"
    card = (tmp_path / "out" / "README.md").read_text()  # the model card, with what the job measured
    assert "## Training" in card and "parity.jsonl (your file)" in card
    assert f"| loss | {summary['before']['loss']:.4f} | {summary['after']['loss']:.4f} |" in card
    record = read_adapter(tmp_path / "out")
    assert record.config.rank == "full" and len(record.layers) == 14
    model, _ = load_model(str(workspace / "model"))
    loaded = SigmaModel.from_pretrained(model, tmp_path / "out")
    assert any(
        float(layer.sigma_adapters["default"].vector.abs().max()) > 0
        for layer in loaded.spectral_layers().values()
    )


def test_same_seed_same_result(workspace, tmp_path):
    first = train(settings(workspace, tmp_path / "a", steps=6, eval_accuracy=0))
    second = train(settings(workspace, tmp_path / "b", steps=6, eval_accuracy=0))
    assert first["loss_history"] == second["loss_history"]
    for name, layer in read_adapter(tmp_path / "a").layers.items():
        assert torch.equal(layer.vector, read_adapter(tmp_path / "b").layers[name].vector)


def test_packed_training_follows_the_padded_run(workspace, tmp_path, capsys):
    padded = train(settings(workspace, tmp_path / "a", steps=8, packing=False))
    assert "packing: off" not in capsys.readouterr().err  # not asked for: nothing to say
    packed = train(settings(workspace, tmp_path / "b", steps=8))
    assert "packing: on" in capsys.readouterr().err
    assert packed["settings"]["packing"] and not padded["settings"]["packing"]
    torch.testing.assert_close(packed["loss_history"], padded["loss_history"], rtol=1e-3, atol=1e-3)
    for when in ("before", "after"):
        assert packed[when]["loss"] == pytest.approx(padded[when]["loss"], abs=2e-4)
        assert packed[when]["accuracy"] == padded[when]["accuracy"]


def test_the_base_models_score_is_kept_for_the_next_run(workspace, tmp_path, capsys, monkeypatch):
    first = train(settings(workspace, tmp_path / "a", steps=2))
    assert "an earlier run" not in capsys.readouterr().err
    scored = []
    monkeypatch.setattr(sigmatune.training.scores, "heldout_loss", lambda *a: scored.append(a) or 0.0)
    second = train(settings(workspace, tmp_path / "b", steps=2))
    assert "an earlier run" in capsys.readouterr().err
    assert second["before"] == first["before"] and len(scored) == 1  # only the adapted model was scored
    third = train(settings(workspace, tmp_path / "c", steps=2, heldout=20))  # another split: scored anew
    assert third["before"]["examples"] == 20 and len(scored) == 3
    assert (
        {"setup", "model and data", "bases", "score before", "training", "score after", "saving"}
        >= set(first["seconds"])
        >= {"model and data", "training"}
    )


def test_cli_commands_in_process(workspace, tmp_path, capsys):
    out = tmp_path / "cli"
    args = cli_train(workspace, "--rank", "4")
    args += [
        "--steps",
        "8",
        "--heldout",
        "20",
        "--eval-accuracy",
        "5",
        "--lr",
        "0.05",
        "--no-packing",
        "--setup-seconds",
        "12.34",
        "--output-dir",
        str(out),
    ]
    assert main(args) == 0
    assert "held-out loss" in capsys.readouterr().out and (out / WEIGHTS_NAME).exists()
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["seconds"]["setup"] == 12.3
    recorded = summary["settings"]
    assert (recorded["rank"], recorded["structure"], recorded["lr"], recorded["packing"]) == (
        4,
        "diagonal",
        0.05,
        False,
    )
    assert main(["eval", str(out), "--heldout", "10", "--eval-accuracy", "4"]) == 0
    assert "adapted:    held-out loss" in capsys.readouterr().out
    assert main(["inspect", str(out), "--plot", str(tmp_path / "scales.png")]) == 0
    assert (tmp_path / "scales.png").stat().st_size > 10_000
    assert "14 layers, 56 trained numbers" in capsys.readouterr().out
    assert main(["generate", str(out), "Is 4 even?", "--max-new-tokens", "3"]) == 0
    assert main(["export", str(out), str(tmp_path / "lora")]) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 4
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    merged, _ = load_model(str(tmp_path / "merged"))
    adapted, _ = load_model(str(workspace / "model"))
    adapted = SigmaModel.from_pretrained(adapted, out)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_reports_bad_input_clearly(workspace, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.jsonl"), "--model", str(workspace / "model")]) == 1
    assert "sigmatune train: error:" in capsys.readouterr().err
    assert main(["train", "--update", "sideways", "--output-dir", str(tmp_path / "x")]) == 1
    assert "update must be one of" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_runs_the_command_line(workspace, tmp_path):
    out = tmp_path / "sub"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sigmatune",
            "train",
            "--model",
            str(workspace / "model"),
            "--data",
            str(workspace / "parity.jsonl"),
            "--steps",
            "3",
            "--heldout",
            "10",
            "--eval-accuracy",
            "2",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "before" in done.stdout and "after" in done.stdout and (out / WEIGHTS_NAME).exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "/no/such/model"], "no model at /no/such/model"),
        (["--batch-size", "100000", "--max-length", "60"], r"may need ~.* GiB for activations, more than"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--lr", "-1"], "lr must be a positive learning rate"),
    ],
)
def test_bad_settings_get_a_clear_message_and_no_traceback(workspace, tmp_path, capsys, extra, message):
    assert main(cli_train(workspace, "--output-dir", str(tmp_path / "o"), *extra)) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_max_length_is_capped_at_the_model_context(workspace, tmp_path, capsys):
    args = cli_train(workspace, "--steps", "1")
    assert main([*args, "--max-length", "100000", "--output-dir", str(tmp_path), "--eval-accuracy", "0"]) == 0
    assert "--max-length 100000 capped at the model's context of 64 tokens" in capsys.readouterr().err
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["settings"]["max_length"] == 64


def test_empty_data_file_is_refused(workspace, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["train", "--model", str(workspace / "model"), "--data", str(tmp_path / "empty.jsonl")]) == 1
    assert "needs at least 2 examples" in capsys.readouterr().err


def test_ctrl_c_during_training_leaves_the_saved_adapter_intact(workspace, tmp_path):
    out = tmp_path / "keep"
    train(settings(workspace, out, steps=2, eval_accuracy=0))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = [sys.executable, "-u", "-m", "sigmatune", "train", "--model", str(workspace / "model")]
    command += ["--data", str(workspace / "parity.jsonl"), "--steps", "1000000", "--eval-accuracy", "0"]
    job = subprocess.Popen(  # SIGINT at its default: a shell's background job would inherit "ignored"
        [*command, "--output-dir", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in job.stderr:  # wait until training has started
        if line.startswith("before:"):
            break
    time.sleep(1.0)
    job.send_signal(signal.SIGINT)
    err = job.stderr.read()
    assert job.wait(timeout=60) == 130
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err, err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != CHECKPOINT_NAME}
    assert after == before  # the adapter and summary as they were (a checkpoint of the new run may be there)


class NaNGradient(torch.autograd.Function):
    """Passes a loss through unchanged; its backward sends NaN gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def failing_loss(monkeypatch, at_call: int, how: str) -> None:
    """Make the training loss (packed or padded, whichever the loop computes) fail at one call: a NaN loss,
    NaN gradients, or a crash (KeyboardInterrupt)."""
    real, calls = sigmatune.training.loop.batch_loss, [0]

    def batch_loss(*args):
        calls[0] += 1
        loss, count = real(*args)
        if calls[0] != at_call:
            return loss, count
        if how == "crash":
            raise KeyboardInterrupt
        return (loss * float("nan"), count) if how == "loss" else (NaNGradient.apply(loss), count)

    monkeypatch.setattr(sigmatune.training.loop, "batch_loss", batch_loss)


@pytest.mark.parametrize("how", ["crash", "loss", "gradient"])
def test_an_interrupted_or_diverged_run_resumes_to_the_uninterrupted_result(
    workspace, tmp_path, monkeypatch, how
):
    options = dict(steps=12, save_every=4, eval_accuracy=0, heldout=10)
    straight = train(settings(workspace, tmp_path / "straight", **options))
    out = tmp_path / "out"
    train(settings(workspace, out, **{**options, "steps": 2}))  # an older adapter in the output folder
    kept = {p.name: p.read_bytes() for p in out.iterdir()}

    failing_loss(monkeypatch, at_call=10, how=how)  # steps 1-9 run, step 10 fails; checkpoint at step 8
    expected = {"crash": KeyboardInterrupt, "loss": FloatingPointError, "gradient": FloatingPointError}[how]
    with pytest.raises(expected) as failure:
        train(settings(workspace, out, **options))
    if how != "crash":
        message = str(failure.value)
        assert "at step 10" in message and "--resume" in message and str(out / CHECKPOINT_NAME) in message
        assert ("training loss" if how == "loss" else "gradient norm") in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != CHECKPOINT_NAME} == kept
    monkeypatch.undo()

    with pytest.raises(ValueError, match="continue it with --resume"):
        train(settings(workspace, out, **options))  # would overwrite the checkpoint: refused
    with pytest.raises(ValueError, match=r"other settings.*lr 0.1 → 0.05"):
        train(settings(workspace, out, **options, lr=0.05, resume=True))
    resumed = train(settings(workspace, out, **options, resume=True))
    assert resumed["resumed_from_step"] == 8 and resumed["loss_history"] == straight["loss_history"]
    assert resumed["before"] == straight["before"] and resumed["after"] == straight["after"]
    got, want = vectors(out), vectors(tmp_path / "straight")
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert not (out / CHECKPOINT_NAME).exists()  # done: the adapter replaces the checkpoint


def test_resume_needs_a_checkpoint_and_refuses_a_damaged_one(workspace, tmp_path):
    with pytest.raises(ValueError, match=r"no checkpoint .* to continue"):
        train(settings(workspace, tmp_path / "none", resume=True))
    out = tmp_path / "out"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(b"\0" * 100)
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        train(settings(workspace, out, resume=True))
