"""The base model's held-out score, kept in the cache folder: it is the same for every run on one model,
task and split, and scoring takes a good share of a short job on a CPU.

A score is found by a key of everything it depends on: the model (as given, and the size and time of its
local config and weights), the data (as given, and its file's), the split and scoring settings, the dtype,
the device type, and the versions of sigmatune, torch and transformers. One JSON file per key under
<cache>/scores/, holding the key beside the score; a file that cannot be read is scored anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch
import transformers

from ..core.config import cache_root
from ..formats.files import atomic_write_json
from ..hub.loading import resolve_model
from ..version import __version__
from .evaluate import Score
from .settings import TrainSettings


def score_key(settings: TrainSettings, dtype: torch.dtype, device: torch.device) -> dict:
    """What the base model's score depends on."""
    model = Path(resolve_model(settings.model))
    return {
        "model": settings.model,
        "model_files": [_stamp(model / name) for name in ("config.json", "model.safetensors")],
        "data": settings.data,
        "data_file": _stamp(Path(settings.data).expanduser()),
        **{name: getattr(settings, name) for name in ("heldout", "eval_accuracy", "max_length", "seed")},
        "dtype": str(dtype),
        "device": device.type,
        "versions": [__version__, torch.__version__, transformers.__version__],
    }


def cached_score(key: dict) -> Score | None:
    """The score kept under key; None when there is none, or it cannot be read or is not finite."""
    path = _path(key)
    try:
        stored = json.loads(path.read_text())
        score = Score(**stored["score"]) if stored["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # none yet, or unreadable: score anew
        return None
    return score if score is not None and _finite(score) else None


def keep_score(key: dict, score: Score) -> None:
    """Keep a score for the next run; a non-finite one is never kept."""
    if _finite(score):
        atomic_write_json(_path(key), {"key": key, "score": dataclasses.asdict(score)})


def _finite(score: Score) -> bool:
    """Whether a score's loss and accuracy are finite numbers (a file may hold anything)."""
    numbers = (score.loss, 0.0 if score.accuracy is None else score.accuracy)
    return all(type(x) in (int, float) and abs(x) < 1e300 and math.isfinite(x) for x in numbers)


def _path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "scores" / f"{digest}.json"


def _stamp(path: Path) -> list[int] | None:
    """(size, modification time in ns) of a file, or None where there is no such file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns] if path.is_file() else None
