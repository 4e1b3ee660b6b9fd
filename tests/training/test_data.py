"""Tasks from files and from BIG-bench records; registry downloads from a real loopback index."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import threading
from functools import partial

import pytest

from sigmatune.training import data
from sigmatune.training.data import Example, load_task, registry_file
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


def test_a_gguf_file_is_read_once_while_converting(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with data._gguf_read_once():
        first, second = gguf.GGUFReader(path), gguf.GGUFReader(path)
        assert first is second and first.tensors[0].name == "token_embd.weight"
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(
            gguf.MODEL_ARCH.LLAMA, 2
        )
    assert gguf.GGUFReader is original and gguf.GGUFReader(path) is not first  # as it was after the block


class _Index(http.server.SimpleHTTPRequestHandler):
    """A package index on loopback: /simple/<project>/ as PEP 691 JSON, and the files."""

    def do_GET(self):
        if self.path.startswith("/simple/demo/"):
            files = [{"filename": "demo-1.0.tar.gz", "url": "/files/demo-1.0.tar.gz", "hashes": {}}]
            body = json.dumps({"files": files}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def index(tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "demo-1.0.tar.gz").write_bytes(b"payload " * 1000)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Index, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    yield hashlib.sha256(b"payload " * 1000).hexdigest()
    server.shutdown()


def test_registry_file_downloads_once_and_checks_sha256(index, isolated_cache):
    with pytest.raises(RuntimeError, match=r"has sha256 .* expected 0000: refused"):
        registry_file("demo", "demo-1.0.tar.gz", "0000")
    assert not (isolated_cache.parent / "downloads" / "demo-1.0.tar.gz").exists()
    path = registry_file("demo", "demo-1.0.tar.gz", index)
    assert path.read_bytes() == b"payload " * 1000
    assert registry_file("demo", "demo-1.0.tar.gz", "not checked again") == path
    with pytest.raises(RuntimeError, match=r"lists no demo-2\.0\.tar\.gz.*put it at"):
        registry_file("demo", "demo-2.0.tar.gz", index)
