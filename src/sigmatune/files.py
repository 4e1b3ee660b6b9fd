"""Files on disk: atomic writes, and reads of safetensors and JSON only, with errors that name the file.

Every write goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
the target, so a crash at any point leaves either the old file or the new one, never half of one.
Nothing here unpickles: adapters and caches are safetensors (tensors) and JSON (settings).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the umask can only be read by setting it


class AdapterFileError(ValueError):
    """A file sigmatune was asked to read is missing, damaged, or does not fit the model."""

    def __init__(self, path, problem: str, fix: str = ""):
        self.path = str(path)
        message = f"{path}: {problem}"
        super().__init__(f"{message}. {fix}" if fix else message)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save tensors (made contiguous, on CPU) as one safetensors file, atomically."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))


def atomic_write_json(path: str | Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> dict:
    """Read a JSON object from path; any problem is an AdapterFileError naming the file."""
    path = Path(path)
    _check_regular_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(path, f"is not valid JSON ({err})", "re-save it or restore it") from None
    if not isinstance(data, dict):
        raise AdapterFileError(path, f"holds a JSON {type(data).__name__}, expected an object")
    return data


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file (CPU); errors name the file."""
    path = Path(path)
    _check_regular_file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(
            path,
            f"is not a readable safetensors file ({err})",
            "it may be truncated or corrupted; re-save it",
        ) from None
    return tensors, metadata


def _check_regular_file(path: Path) -> None:
    if not path.exists():
        raise AdapterFileError(path, "does not exist", "check the path")
    if not path.is_file():
        raise AdapterFileError(path, "is not a regular file")


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable: fsync the folder entry (not possible on every platform)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
