"""The rows of a quality run shared by its worker processes on one device: each worker takes the next row no other
has taken (a queue, so a worker that ends its rows early goes on instead of idling), and on a GPU only a row
whose memory fits beside the rows running (so eight workers never start eight rows that together overflow it:
eight spam rows at 16 × 384 tokens need ~94 GB, side_by_side.py).

The queue is a folder: a claim file per row taken (by the row's key; made with O_EXCL, so one worker wins), and
while a row runs, a ledger entry with its worker's pid and the memory it needs; admission reads the ledger under a
lock. A worker that died leaves an entry whose pid is gone: it is not counted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


class RowQueue:
    def __init__(self, folder: Path, budget_gb: float | None):
        """folder: shared by the workers (made here if missing); budget_gb: the device memory the rows running at
        once may need in all (None: no limit, as on a CPU)."""
        self.folder, self.budget = folder, budget_gb
        (folder / "running").mkdir(parents=True, exist_ok=True)

    def take(self, pending: list[dict], need: Callable[[dict], float]) -> dict | None:
        """The first row of pending that no worker has taken and whose need (GB) fits beside the rows running —
        or that runs alone, when nothing runs — now claimed by this worker and removed from pending, as is each
        row before it that another worker took; None where none fits now (pending then holds the rows left to try
        again)."""
        with self._locked():
            running = self._running_gb()
            for row in list(pending):
                if self.taken(row):
                    pending.remove(row)  # another worker's
                    continue
                wanted = need(row)
                if self.budget is None or running == 0 or running + wanted <= self.budget:
                    (self.folder / _name(row)).touch(exist_ok=False)
                    entry = {"pid": os.getpid(), "gb": wanted}
                    (self.folder / "running" / _name(row)).write_text(json.dumps(entry))
                    pending.remove(row)
                    return row
        return None

    def taken(self, row: dict) -> bool:
        """Whether a worker has taken the row."""
        return (self.folder / _name(row)).exists()

    def done(self, row: dict) -> None:
        """The row ended (whatever its outcome): its memory is free for others."""
        with self._locked():
            (self.folder / "running" / _name(row)).unlink(missing_ok=True)

    @contextmanager
    def _locked(self):
        """The ledger to this worker alone, until the block ends."""
        with open(self.folder / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _running_gb(self) -> float:
        """The memory the rows running need, in all (read under the lock that done() takes too)."""
        total = 0.0
        for entry in (self.folder / "running").iterdir():
            held = json.loads(entry.read_text())
            if _alive(held["pid"]):
                total += held["gb"]
        return total


def _name(row: dict) -> str:
    """A row's file name, from its fields (task, method, ..., lr, seed: every worker reads the same rows)."""
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:20]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
