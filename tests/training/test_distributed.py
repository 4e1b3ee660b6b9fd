"""Distributed training with real torch.distributed processes (torchrun, gloo on CPU): DDP and FSDP2
train exactly what one process trains on the same global batches (with gradient accumulation), all
ranks hold identical bases, and the adapter saved from any layout loads anywhere."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models import save_tiny_chat_model, vectors

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "distributed_train.py"
HANG_SECONDS = 240  # a 3-step job takes ~10 s; past this it is stuck, and the test shows where
ROWS = [{"input": f"Is {n} even?", "output": "yes" if n % 2 == 0 else "no"} for n in range(150)]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_tiny_chat_model(
        root / "model", [f"{r['input']} {r['output']}" for r in ROWS] + ["system user assistant"]
    )
    (root / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    return root


def free_port() -> int:
    """A port nobody listens on now (accelerate's static rendezvous needs one; torchrun --standalone picks its own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(job: Path, processes: int, output: str, *extra: str, launcher: str = "torchrun") -> str:
    command = [sys.executable, str(SCRIPT)]
    if processes > 1 and launcher == "torchrun":  # --standalone: a free rendezvous port on loopback
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={processes}", str(SCRIPT)]
    if processes > 1 and launcher == "accelerate":  # --multi_gpu is accelerate's torchrun path (gloo on CPU)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines=1"]
        command += [f"--num_processes={processes}", "--mixed_precision=no", "--dynamo_backend=no"]
        command += [f"--main_process_port={free_port()}", str(SCRIPT)]
    args = [
        "--model",
        str(job / "model"),
        "--data",
        str(job / "parity.jsonl"),
        "--steps",
        "3",
        "--global-batch",
        "8",
    ]
    job_process = subprocess.Popen(
        [*command, *args, "--output", str(job / output), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT makes every process print its stack
    )
    try:
        out, err = job_process.communicate(timeout=HANG_SECONDS)
    except subprocess.TimeoutExpired:
        stuck = [
            *descendants(job_process.pid),
            job_process.pid,
        ]  # torchrun starts workers in their own groups
        for pid in stuck:  # a hang: every process prints its Python stack (PYTHONFAULTHANDLER) and dies
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        try:
            out, err = job_process.communicate(timeout=30)
        finally:
            for pid in stuck:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the job hung for {HANG_SECONDS} s; stdout:\n{out[-2000:]}\nstacks:\n{err[-12000:]}")
    assert job_process.returncode == 0, err[-3000:]
    return out


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc: Linux)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.fixture(scope="module")
def reference(job):
    out = run(job, 1, "reference", "--accumulate", "2")
    assert "bases identical on 1 processes" in out
    return vectors(job / "reference")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_train_what_one_process_trains(job, reference, mode):
    out = run(job, 2, mode, "--mode", mode, "--accumulate", "2")
    assert "bases identical on 2 processes" in out
    trained = vectors(job / mode)
    assert trained.keys() == reference.keys() and any(float(v.abs().max()) > 0 for v in trained.values())
    for name, vector in reference.items():
        torch.testing.assert_close(trained[name], vector, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def band_reference(job):
    run(job, 1, "band-reference", "--band", "1", "--accumulate", "2")
    return vectors(job / "band-reference")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_a_band_trains_on_two_processes_what_one_process_trains(job, band_reference, mode):
    out = run(job, 2, f"band-{mode}", "--band", "1", "--mode", mode, "--accumulate", "2")
    assert "bases identical on 2 processes" in out
    trained = vectors(job / f"band-{mode}")
    assert all(v.shape[0] == 3 for v in trained.values()) and any(
        float(v.abs().max()) > 0 for v in trained.values()
    )
    for name, vector in band_reference.items():
        torch.testing.assert_close(trained[name], vector, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_adapters_trained_together_on_two_processes_are_what_one_process_trains(job, mode):
    run(job, 1, "together-reference", "--adapters", "3", "--accumulate", "2")
    run(job, 2, f"together-{mode}", "--adapters", "3", "--mode", mode, "--accumulate", "2")
    for k in range(3):
        reference, trained = (
            vectors(job / "together-reference" / f"a{k}"),
            vectors(job / f"together-{mode}" / f"a{k}"),
        )
        assert trained.keys() == reference.keys() and any(float(v.abs().max()) > 0 for v in trained.values())
        for name, vector in reference.items():
            torch.testing.assert_close(trained[name], vector, rtol=1e-5, atol=1e-6)
    first, second = vectors(job / "together-reference" / "a0"), vectors(job / "together-reference" / "a1")
    assert any(not torch.equal(first[n], second[n]) for n in first)  # each adapter learned from its own rows


def test_accelerate_launch_trains_what_one_process_trains(job, reference):
    pytest.importorskip("accelerate")
    out = run(job, 2, "accelerate", "--mode", "ddp", "--accumulate", "2", launcher="accelerate")
    assert "bases identical on 2 processes" in out
    trained = vectors(job / "accelerate")
    for name, vector in reference.items():
        torch.testing.assert_close(trained[name], vector, rtol=1e-5, atol=1e-6)


def test_resume_a_one_process_adapter_on_two_processes(job, reference):
    run(job, 1, "resumed-1", "--resume", str(job / "reference"))
    run(job, 2, "resumed-2", "--mode", "fsdp2", "--resume", str(job / "reference"))
    one, two = vectors(job / "resumed-1"), vectors(job / "resumed-2")
    for name, vector in one.items():
        torch.testing.assert_close(two[name], vector, rtol=1e-5, atol=1e-6)
        assert not torch.equal(vector, reference[name])  # it did train further


def test_mixed_precision_runs_and_saves_a_loadable_adapter(job):
    out = run(job, 2, "bf16", "--mode", "ddp", "--dtype", "bfloat16")
    assert "step 3: loss" in out
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in vectors(job / "bf16").values())


def test_decoder_layers_are_found_for_sharding_and_unknown_models_get_a_clear_error():
    from sigmatune import SigmaConfig, get_sigma_model
    from sigmatune.training.distributed import decoder_layers, distribute, split
    from tests.models import tiny_gpt2, tiny_llama

    llama = get_sigma_model(tiny_llama(), SigmaConfig(rank=2))
    assert decoder_layers(llama) == list(llama.base_model.model.layers)
    assert len(decoder_layers(tiny_gpt2())) == 2
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode must be one of"):
        distribute(llama, "zero3", 1, "float32", torch.device("cpu"))
    assert distribute(llama, "ddp", 1, "float32", torch.device("cpu")) is llama  # no process group: as is
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
