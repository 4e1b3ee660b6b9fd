"""The benchmarks' results files: JSON lists of rows merged by a key, and objects of facts merged by name;
written atomically."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def merge_rows(path: Path, rows: list[dict], key: tuple[str, ...] | Callable[[dict], tuple]) -> list[dict]:
    """Rows merged into the file (an earlier row with the same key values is replaced; a missing key reads
    as None; or key(row) gives the values), written to a temp file and renamed over it: a run cut short
    leaves the old file or the new one."""
    values = key if callable(key) else lambda r: tuple(r.get(k) for k in key)
    keys = {values(r) for r in rows}
    merged = [r for r in load_rows(path) if values(r) not in keys] + rows
    write_json(path, merged)
    return merged


def merge_facts(path: Path, facts: dict) -> dict:
    """A JSON object of facts updated with these (the keys a run did not measure keep their values),
    written atomically."""
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **facts}
    write_json(path, merged)
    return merged


def write_json(path: Path, value) -> None:
    """Written to a temp file and renamed over path: a run cut short leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    temporary.replace(path)
