"""`sigmatune serve` as a user runs it (issue 38): a real process on a real port. A bad adapter folder is
skipped with a warning naming it (the server starts with the others, or with the base model alone); the
"serving … on" line comes only once the socket is bound; a port in use is an error naming the port."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from sigmatune.commands import build_server
from tests.serving import test_serve

workspace = test_serve.workspace  # its fixture (this module gets its own)
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # s for the process to load the tiny model and answer


def start(workspace, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "sigmatune", "serve", "--model", str(workspace / "model")]
    command += ["--device", "cpu", "--dtype", "float32", "--max-batch", "4", *options]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def first_line(stream, seconds: float = TIMEOUT) -> str:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    return lines.get(timeout=seconds)


def broken_copy(workspace, name: str) -> Path:
    folder = shutil.copytree(workspace / "adapters" / "wide", workspace / "adapters" / name)
    (folder / "sigma_adapter.safetensors").write_bytes(b"\x00garbage" * 9)
    return folder


def test_a_bad_adapter_folder_is_skipped_and_the_line_names_the_bound_port(workspace):
    broken_copy(workspace, "broken")
    process = start(workspace, "--adapters", str(workspace / "adapters"), "--port", "0")
    try:
        line = first_line(process.stdout)
        assert line.startswith("serving ") and "with 2 adapters" in line, line
        url = line.split(" on ")[-1].strip()
        assert not url.endswith(":0/v1")  # the port the socket got, not the one asked for
        names = {m["id"] for m in httpx.get(url + "/models", timeout=30).json()["data"]}
        assert {"base", "wide", "attn"} <= names  # "broken" too: a folder on disk, as before it is tried
        answer = httpx.post(url + "/completions", json={"model": "wide", "prompt": "Is 2", "max_tokens": 2})
        assert answer.status_code == 200
        refused = httpx.post(url + "/completions", json={"model": "broken", "prompt": "Is 2"}).json()
        assert refused["error"]["code"] == "adapter_invalid"  # asked for by name: the reason, in a 400
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=60)
        shutil.rmtree(workspace / "adapters" / "broken")
    assert "broken" in errors and "skipped" in errors and "POST /v1/adapters" in errors, errors


def test_a_port_in_use_is_an_error_naming_it(workspace):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start(workspace, "--port", str(port))
        output, errors = process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0
    assert "serving" not in output, output  # nothing claims to serve
    assert f"127.0.0.1:{port}" in errors and "in use" in errors and "--port" in errors, errors
    assert "Traceback" not in errors


def test_with_no_good_adapter_folder_the_base_model_still_serves(workspace, tmp_path, capsys):
    folder = broken_copy(workspace, "only-bad")
    shutil.move(folder, tmp_path / "only-bad")
    state, engine = build_server(str(workspace / "model"), str(tmp_path), None, "cpu", "float32", 2, None)
    try:
        assert state.bank.names() == ["base"]
        assert "only-bad" in capsys.readouterr().err
    finally:
        engine.stop()


@pytest.mark.parametrize("option", ["--temperature=-1", "--temperature=3"])
def test_a_bad_default_temperature_is_refused(workspace, option):
    process = start(workspace, option, "--port", "0")
    _, errors = process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0 and "--temperature" in errors, errors
