"""Files on disk: atomic writes, and reads of safetensors and JSON only, with errors that name the file.

Every write goes to a temporary file in the same folder, is flushed and fsynced (caches skip the fsync:
they may be lost, never torn), then renamed over the target, so a crash at any point leaves either the old
file or the new one, never half of one.
Nothing here unpickles: adapters and caches are safetensors (tensors) and JSON (settings).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import torch

CHECKSUM = "sigmatune_sha256"  # the metadata key of the checksum that checksummed() writes
STALE_SECONDS = 600  # a temp file this old belongs to a write that died
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
    with atomic_file(path) as temp:
        temp.write(data)


@contextlib.contextmanager
def atomic_file(path: str | Path, durable: bool = True):
    """A temporary file beside path to write in the block; when the block ends without error it is flushed,
    fsynced (unless not durable: a cache, which a crash may lose but never leaves half-written under its
    name) and renamed over path. On an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(handle, "wb") as temp:
            yield temp
            temp.flush()
            if durable:
                os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(path.parent)
    _remove_stale_temporaries(path)


def atomic_stream_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], durable: bool = True
) -> None:
    """atomic_save_tensors, one tensor at a time: the safetensors header (from the shapes alone), then each
    tensor's bytes copied to the host and written in turn, so at most one tensor is on the host at once
    (a whole model's bases can be many GB)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with atomic_file(path, durable) as temp:
        temp.write(len(text).to_bytes(8, "little") + text)
        for tensor in tensors.values():
            temp.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


@contextlib.contextmanager
def staged_folder(target: str | Path, replace: bool = False):
    """A temporary folder beside target, to fill in the block; when the block ends without error it takes
    target's place by one rename, so target is absent (or as it was) or the whole new folder. An existing
    target must be an empty folder (rename(2) replaces only those; check_output_folder says so before the
    work) unless replace, for folders of sigmatune's own (a cache): then it is moved aside and removed. What
    it holds gets the usual permissions (_usual_permissions); the temporary folder is removed in any case."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        yield staging
        _usual_permissions(staging)
        retired = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.old"
        if replace and target.exists():
            target.rename(retired)
        try:
            staging.rename(target)
        except OSError as err:  # a file, or a folder that filled up while we worked
            raise AdapterFileError(
                target, f"could not take the new folder's place ({err.strerror})"
            ) from None
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _usual_permissions(folder: Path) -> None:
    """Folders 0777 and files 0666, less the umask, as a plain mkdir and open give them (mkdtemp makes
    0700, and some writers, transformers' save_pretrained among them, leave their files 0600)."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)


def check_output_folder(target: str | Path, source: str | Path | None = None) -> None:
    """Refuse an output folder that would replace what the user did not ask to replace: the source folder
    itself, or a path that holds anything (a file, or a folder that is not empty). Call it before the work."""
    target = Path(target)
    if source is not None and target.resolve() == Path(source).resolve():
        raise AdapterFileError(target, "is the adapter itself", "write the output to a new folder")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise AdapterFileError(target, "is a file, not a folder", "name a new or empty folder for the output")
    if target.exists() and any(target.iterdir()):
        held = sorted(p.name for p in target.iterdir())
        raise AdapterFileError(
            target,
            f"is not empty (it holds {', '.join(held[:3])}{', …' if len(held) > 3 else ''})",
            "name a new or empty folder for the output; nothing in it was changed",
        )


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save tensors (made contiguous, on CPU) as one safetensors file, atomically."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))


def atomic_write_json(path: str | Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


MAX_JSON_BYTES = 16 * 2**20  # settings, summaries and task lists are far smaller


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """Read a JSON object of at most max_bytes from path; any problem is an AdapterFileError naming the file."""
    path = Path(path)
    _check_regular_file(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterFileError(
            path, f"is {_mib(size)}, more than the {_mib(max_bytes)} a file of this kind may be"
        )
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read(max_bytes + 1).decode("utf-8"))
    except RecursionError:
        raise AdapterFileError(path, "is JSON nested too deeply to be sigmatune's") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(
            path, f"is not valid JSON ({str(err)[:200]})", "re-save it or restore it"
        ) from None
    if not isinstance(data, dict):
        raise AdapterFileError(path, f"holds a JSON {type(data).__name__}, expected an object")
    return data


def load_tensors(
    path: str | Path,
    check: Callable[[dict[str, str], dict[str, tuple[str, list[int]]]], None] | None = None,
    max_header: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file (CPU); errors name the file.

    check(metadata, declared), where declared maps each tensor name to its (dtype, shape) as the file's
    header states them, runs before any tensor is read: it refuses a file (by raising) before a
    declared shape can cost memory. safetensors itself checks that the header fits the file. A header
    longer than max_header bytes is refused before it is parsed.
    """
    path = Path(path)
    _check_regular_file(path)
    if max_header is not None:
        _check_header_length(path, max_header)
    try:
        with safetensors.safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            if check is not None:
                declared = {}
                for name in reader.keys():  # noqa: SIM118 (a reader, not a dict)
                    part = reader.get_slice(name)
                    declared[name] = (part.get_dtype(), list(part.get_shape()))
                check(metadata, declared)
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
    except AdapterFileError:
        raise
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as err:
        raise AdapterFileError(
            path,
            f"is not a readable safetensors file ({str(err)[:200]})",
            "it may be truncated or corrupted; re-save it",
        ) from None
    return tensors, metadata


def tensors_digest(preamble: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over a text and every tensor's name, dtype, shape and bytes (in name order): a checksum
    that a flipped bit anywhere in the header text or the data changes."""
    digest = hashlib.sha256(preamble.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checksummed(key: str, text: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """safetensors metadata: text under key, and under CHECKSUM the tensors_digest of it and the tensors."""
    return {key: text, CHECKSUM: tensors_digest(text, tensors)}


def check_digest(
    path: str | Path, metadata: dict[str, str], key: str, tensors: dict[str, torch.Tensor]
) -> None:
    """Refuse a file whose metadata[CHECKSUM] is not the tensors_digest of metadata[key] and its tensors."""
    if metadata[CHECKSUM] != tensors_digest(metadata[key], tensors):
        raise AdapterFileError(
            path,
            "fails its checksum: the data or the header changed after it was saved",
            "the file is damaged; download or save it again",
        )


def check_inside(folder: Path, path: Path) -> None:
    """Refuse a file that is a link out of its folder (a downloaded adapter must not make us read others)."""
    target = path.resolve()
    if target.parent != folder.resolve():
        raise AdapterFileError(
            path,
            f"is a link to {target}, outside the adapter folder",
            "copy the file into the folder; links that leave an adapter folder are refused",
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _check_header_length(path: Path, max_header: int) -> None:
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
    if length > max_header:
        raise AdapterFileError(
            path,
            f"declares a header of {length:,} bytes, more than the {max_header:,} of any file of this kind",
            "the file is damaged or not what it claims to be",
        )


def _check_regular_file(path: Path) -> None:
    if not path.exists():
        raise AdapterFileError(path, "does not exist", "check the path")
    if not path.is_file():  # a folder, a FIFO (opening it would wait forever), a device
        raise AdapterFileError(path, "is not a regular file")


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temp files of earlier writes of path that a killed process left (older than STALE_SECONDS,
    so a write in progress elsewhere keeps its own)."""
    now = time.time()
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > STALE_SECONDS:
                stale.unlink()


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
