"""Every script in benchmarks/ runs on the CPU with a tiny shape and a step or two, as a subprocess, exits 0 and
writes its results file (into a temp folder, never benchmarks/results): a script that no longer fits the
library fails here, not on the GPU machine. The Triton kernels run in Triton's interpreter. The scripts run
two at a time (a CPU run proves nothing about speed; it only has to finish)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sigmatune
from sigmatune.training.lr_auto import RULE
from tests.models import save_tiny_chat_model

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "common")
TINY = ["--shape", "tiny", "--device", "cpu"]
TRAIN = [*TINY, "--tokens", "1x16", "--warmup", "1", "--steps", "1"]
SERVE = [*TINY, "--batches", "2", "--ranks", "16", "--prompt", "8", "--decode", "4"]
KERNEL = ["--device", "cpu", "--d", "64"]

# run name → (script, its arguments, ...: one command each, in order; {out}: the results file, {tmp}: a temp
# folder with the inputs)
RUNS = {
    "train_step": ("train_step", [*TRAIN, "--rows", "frozen:0,sigmatune:full", "--out", "{out}"]),
    "train_many": ("train_many", [*TINY, "--tokens", "4x8", "--adapters", "2,4", "--warmup", "1", "--steps", "1", "--sweep", "--sweep-shape", "tiny", "--sweep-tokens", "1x8", "--sweep-steps", "1", "--out", "{out}"]),
    "profile_step": ("profile_step", [*TRAIN, "--rank", "16", "--top", "3", "--saved"]),
    "quantized": ("quantized", [*TRAIN, "--rows", "bf16:frozen:0,ao-int8:sigmatune:16", "--out", "{out}"]),
    "layer_overhead": ("layer_overhead", [*KERNEL, "--n", "32", "--rank", "16", "--calls", "1", "--repeats", "1", "--out", "{out}"]),
    "transform_shapes": ("transform_shapes", [*KERNEL, "--n", "32", "--ranks", "16", "--calls", "1", "--grid", "16/4/32/3", "--out", "{out}"]),
    "rows_kernel": ("rows_kernel", [*KERNEL, "--rows", "4", "--ranks", "16", "--members", "1,3", "--shapes", "default", "--launches", "1", "--out", "{out}"]),
    "svd_methods": ("svd_methods", [*TINY, "--batch", "1", "--out", "{out}"]),
    "serve": ("serve", [*SERVE, "--timed", "1", "--peft", "", "--resident", "4", "--out", "{out}"]),
    "profile_serve": ("profile_serve", [*SERVE, "--top", "3"]),
    "before_after": ("before_after", ["--before", str(ROOT), "--phases", "eager,serve", "--budget", "1e9", "--rows", "frozen:0,sigmatune:16", "--train-args", shlex.join(TRAIN), "--serve-args", shlex.join([*SERVE, "--timed", "1", "--resident", "4"]), "--out", "{out}"]),
    "load": ("load", ["--requests", "26", "--concurrency", "2", "--out", "{out}"]),
    "side_by_side": ("side_by_side", [*TINY, "--workers", "1,2", "--tokens", "2x8", "--warmup", "1", "--steps", "1", "--out", "{out}"]),
    "multi_gpu": ("multi_gpu", ["--device", "cpu", "--warmup", "1", "--steps", "1", "--shapes", "tiny", "--modes", "ddp", "--gpus", "1", "--rank", "16", "--global-batch", "2", "--length", "16", "--out", "{out}"]),
    "quality": ("quality", ["run", "--device", "cpu", "--tasks", "sentiment,spam", "--methods", "none,lora:1,sigmatune:16,ia3,quality", "--seeds", "0,1", "--encoder", "{tmp}/encoder", "--causal-model", "{tmp}/chat", "--items", "{tmp}/items", "--causal-steps", "2", "--limit", "64,12", "--workers", "2", "--out", "{out}"], ["run", "--device", "cpu", "--tasks", "sentiment,spam", "--methods", "none,lora:1,sigmatune:16,ia3,quality", "--seeds", "0,1", "--encoder", "{tmp}/encoder", "--causal-model", "{tmp}/chat", "--items", "{tmp}/items", "--causal-steps", "2", "--limit", "64,12", "--workers", "2", "--out", "{out}"], ["report", "--out", "{out}"]),
}  # fmt: skip


def tiny_encoder(folder: Path) -> Path:
    """A 1-layer BERT (the classify setting's architecture) with a WordPiece tokenizer, as a folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    words = ["the", "a", "is", "was", "not", "true", "false", "claim", "fact", "river", "city", "born", "in"]
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def suite_items(folder: Path) -> Path:
    """Items of the suite's sentiment and spam tasks as `quality.py prepare` writes them: 40 of each class
    (lr auto needs 64 training examples to spare a slice to score on)."""
    folder.mkdir(parents=True)
    tasks = {"sentiment": ["negative", "neutral", "positive"], "spam": ["ham", "spam"]}
    for task, labels in tasks.items():
        rows = [[f"the claim {i} is {label}", label, f"group {i}"] for i in range(40) for label in labels]
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (folder / f"{task}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """{run name: (exit code, output, results file or None)}: the runs this session selected, two at a time."""
    items = [
        item for item in request.session.items if item.module is request.module and hasattr(item, "callspec")
    ]
    selected = [item.callspec.params["run"] for item in items]
    tmp = tmp_path_factory.mktemp("benchmarks")
    if any(run.startswith("quality") for run in selected):
        tiny_encoder(tmp / "encoder")
        suite_items(tmp / "items")
        save_tiny_chat_model(tmp / "chat", ["Q: Who? A: someone", "The capital of France is Paris."])
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",  # the kernels on CPU tensors
        "HF_HUB_OFFLINE": "1",
        "SIGMATUNE_CACHE": str(tmp / "cache"),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(sigmatune.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }

    def run(name: str) -> tuple[int, str, Path | None]:
        script, *commands = RUNS[name]
        out, output = tmp / f"{name.replace(' ', '-')}.json", ""
        for arguments in commands:
            arguments = [a.format(out=out, tmp=tmp) for a in arguments]
            command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *arguments]
            done = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
            output += done.stdout + done.stderr
            if done.returncode != 0:
                break
        writes = any("{out}" in argument for arguments in commands for argument in arguments)
        return done.returncode, output, out if writes else None  # the profilers print, writing nothing

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(selected, pool.map(run, selected), strict=True))


def test_every_script_has_a_smoke_run():
    assert sorted({script for script, *_ in RUNS.values()}) == SCRIPTS


@pytest.mark.parametrize("run", list(RUNS))
def test_the_script_runs_on_a_cpu_and_writes_its_results(runs, run):
    code, output, out = runs[run]
    assert code == 0, output[-4000:]
    if out is None:
        assert "Self CPU" in output or "operators" in output, output[-4000:]  # a profile was printed
        return
    results = json.loads(out.read_text())
    rows = results if isinstance(results, list) else results["rows"]
    assert rows, output[-4000:]
    if run == "quality":  # no row failed (a failed one has no loss), lr auto ran on both seeds, the rows'
        # keys are the ones other tools read, and `report` drew the plot
        assert all(row["eval_loss"] is not None for row in rows), output[-4000:]
        auto = [(r["task"], r["seed"]) for r in rows if r["lr"] == "auto"]
        assert sorted(auto) == [(t, s) for t in ("sentiment", "spam") for s in (0, 0, 1, 1)], output[-4000:]
        details = json.loads(out.with_name(out.stem + "_runs.json").read_text())
        tried = [
            r["lr_auto"]["losses"] for r in details if r["lr"] == "auto"
        ]  # lr auto's window, as the trainer's
        assert len(tried) == 8 and all(len(losses) == 4 for losses in tried), output[-4000:]
        assert {r["lr_auto_rule"] for r in details if r["lr"] == "auto"} == {
            RULE
        }  # a changed rule runs them again
        keys = {
            "task",
            "model",
            "method",
            "structure",
            "band",
            "rank",
            "lr",
            "seed",
            "trainable",
            "eval_loss",
        }
        keys |= {"accuracy", "recipe", "step_ratio"}
        assert all(set(r) - {"lr_chosen"} == keys for r in rows), rows[0]
        assert out.with_suffix(".png").stat().st_size > 0
        printed = [line for line in output.splitlines() if line.startswith('{"task"')]
        assert len(printed) == len(rows), output[-4000:]  # the second run resumed: it ran no row again
    if run == "train_many":  # exactly the keys other tools read; each K in each mode, and the sweep
        assert all(
            tuple(row) == ("adapters", "rows", "mode", "step_ms", "ratio_vs_one", "device") for row in rows
        )
        assert {(r["adapters"], r["mode"]) for r in rows} == {
            (2, "eager"),
            (4, "eager"),
            (2, "compiled"),
            (4, "compiled"),
            (3, "sweep"),
        }
    if run == "before_after":  # each phase compared the two checkouts (here both this one)
        assert {row["phase"] for row in rows} == {"eager", "serve"}, output[-4000:]


def test_the_readme_lists_every_script_and_its_latest_results():
    """benchmarks/README.md's table names every script once, and every results file it links exists; every
    results file is linked (one latest file per benchmark: earlier runs live in git history)."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    assert sorted(line.split("`")[1].removesuffix(".py") for line in rows) == SCRIPTS
    linked = set(re.findall(r"\]\(results/([^)]+)\)", readme))
    assert linked == {p.name for p in (ROOT / "benchmarks" / "results").iterdir()}
