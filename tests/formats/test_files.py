"""Atomic writes and safe reads."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from sigmatune.formats.files import (
    AdapterFileError,
    atomic_save_tensors,
    atomic_stream_tensors,
    atomic_write_bytes,
    load_tensors,
    read_json,
    staged_folder,
)

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "src" / "sigmatune"


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "adapter.bin"
    atomic_write_bytes(target, b"old contents")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails inside the write, after the temp file exists
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.bin"]


def test_tensors_round_trip_with_metadata(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    atomic_save_tensors(tmp_path / "t.safetensors", tensors, {"note": "hello"})
    loaded, metadata = load_tensors(tmp_path / "t.safetensors")
    assert metadata == {"note": "hello"}
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("durable", [True, False])
def test_streamed_tensors_are_the_files_safetensors_writes(tmp_path, durable):
    """The header built from shapes alone and the bytes written one tensor at a time make the same tensors
    and metadata as safetensors' own writer, for every dtype a cache or adapter holds (odd sizes too)."""
    tensors = {
        "basis": torch.randn(7, 3),
        "wide": torch.randn(5, dtype=torch.float64),
        "half": torch.randn(3, 3).bfloat16(),
        "f16": torch.randn(1).half(),
        "indices": torch.arange(5),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    atomic_stream_tensors(tmp_path / "s.safetensors", tensors, {"keys": "[1, 2]"}, durable=durable)
    atomic_save_tensors(tmp_path / "t.safetensors", tensors, {"keys": "[1, 2]"})
    streamed, metadata = load_tensors(tmp_path / "s.safetensors")
    written, _ = load_tensors(tmp_path / "t.safetensors")
    assert metadata == {"keys": "[1, 2]"} and list(streamed) == list(written)
    for name, tensor in tensors.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name


def test_a_stream_that_fails_midway_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "cache.safetensors"
    atomic_stream_tensors(target, {"a": torch.ones(3)}, {})
    with pytest.raises(RuntimeError):  # the second tensor cannot be copied to the host
        atomic_stream_tensors(target, {"a": torch.zeros(3), "b": torch.zeros(2, device="meta")}, {})
    assert torch.equal(load_tensors(target)[0]["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"]


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match=r"c\.json: is not valid JSON"):
        read_json(tmp_path / "c.json")
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="holds a JSON list, expected an object"):
        read_json(tmp_path / "c.json")
    with pytest.raises(AdapterFileError, match="is not a regular file"):
        load_tensors(tmp_path)


def test_the_package_never_unpickles():
    pattern = re.compile(r"\bpickle\b|torch\.load\(|weights_only\s*=\s*False|np\.load\(")
    offenders = [p.name for p in SOURCE.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_json_reads_are_bounded_and_never_block(tmp_path):
    import os

    (tmp_path / "big.json").write_text('{"a": "' + "x" * 2**20 + '"}')
    with pytest.raises(AdapterFileError, match=r"is 1\.0 MiB, more than the 0\.5 MiB"):
        read_json(tmp_path / "big.json", max_bytes=2**19)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(AdapterFileError, match="not a regular file"):
        read_json(tmp_path / "fifo.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFileError, match="nested too deeply"):
        read_json(tmp_path / "deep.json")


def test_a_staged_folder_never_replaces_one_that_holds_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    refused = pytest.raises(AdapterFileError, match="could not take the new folder's place")
    with refused, staged_folder(tmp_path / "out") as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    with staged_folder(tmp_path / "out", replace=True) as staging:  # a folder of sigmatune's own
        (staging / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
