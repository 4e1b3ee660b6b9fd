"""Training checkpoints taken apart and forged: a checkpoint's JSON and tensors edited at will and written
back with the checksum recomputed, so that only the checks on its fields can catch the edit."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sigmatune.formats.checkpoint import KEY
from sigmatune.formats.files import CHECKSUM, tensors_digest


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the JSON of the run's state, the tensors) of a checkpoint, read without sigmatune's checks."""
    with safetensors.safe_open(str(path), framework="pt") as reader:
        text = reader.metadata()[KEY]
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
    return json.loads(text), tensors


def write_forged(path: Path, info, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint holding `info` (a JSON value, or text taken as it is) and the tensors, with a valid
    checksum."""
    text = info if isinstance(info, str) else json.dumps(info)
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {KEY: text, CHECKSUM: tensors_digest(text, tensors)}
    safetensors.torch.save_file(tensors, str(path), metadata)
