"""training_summary.json: what `sigmatune train` records beside an adapter (settings, task, scores,
timings), read back by the adapter commands to find the base model, the data and the held-out split.

Read like any file sigmatune did not just write: bounded in size before it is read, JSON only, and every
part a command uses checked for its type (each known setting, the task's instruction); a field of no
setting is ignored. Anything off is an AdapterFileError naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path

from ..formats.files import AdapterFileError, read_json
from .settings import TrainSettings, from_record

SUMMARY_NAME = "training_summary.json"
FIX = "restore the one `sigmatune train` wrote, or delete it (the commands then take their defaults and options)"


def read_summary(adapter_dir: str | Path) -> dict:
    """The training_summary.json beside an adapter, checked ({} when there is none)."""
    path = Path(adapter_dir) / SUMMARY_NAME
    if not path.exists():
        return {}
    summary = read_json(path)  # at most files.MAX_JSON_BYTES (a million steps' losses are ~10 MB)
    for part in ("settings", "task"):
        if not isinstance(summary.get(part, {}), dict):
            raise AdapterFileError(path, f"holds a {part!r} that is not a JSON object", FIX)
    instruction = summary.get("task", {}).get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise AdapterFileError(path, f"holds a 'task.instruction' of {instruction!r:.60}, not text", FIX)
    settings_of(path, summary)
    return summary


def settings_of(path: Path, summary: dict) -> TrainSettings:
    """The TrainSettings a summary records (the defaults for what it does not); errors name the file."""
    try:
        return from_record(summary.get("settings", {}))
    except ValueError as err:
        raise AdapterFileError(path, f"records settings that cannot be used: {err}", FIX) from None
