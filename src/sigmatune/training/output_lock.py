"""One training run per output folder: a lock file there while a run trains into it.

    <output_dir>/.sigmatune-train.lock     the pid of the run that holds the folder

It is created with O_CREAT | O_EXCL (so of two runs starting at once exactly one gets it) and removed when
the run ends, however it ends short of SIGKILL. A second run into the folder is refused with the folder
and the other run's pid; the lock of a run that no longer exists (killed) is taken over, with a note.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

LOCK_NAME = ".sigmatune-train.lock"


@contextlib.contextmanager
def output_lock(folder: str | Path):
    """Hold folder's lock for the block (the folder is made if need be, and removed again if the run
    leaves it empty); a folder another live run holds is a ValueError naming both."""
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    _take(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
            if made:
                folder.rmdir()  # only if empty: a run that failed before writing anything


def _take(path: Path) -> None:
    """Create the lock with this pid, taking over one whose process is gone."""
    if _create(path):
        return
    holder = _holder(path)
    if holder is None or _alive(holder):
        raise ValueError(_in_use(path, holder))
    print(f"{path}: taking over the lock of pid {holder}, which no longer runs", file=sys.stderr, flush=True)
    if _holder(path) == holder:  # still the dead run's (not one that took it over meanwhile)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if not _create(path):
        raise ValueError(_in_use(path, _holder(path)))


def _create(path: Path) -> bool:
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as lock:
        lock.write(f"{os.getpid()}\n")
    return True


def _holder(path: Path) -> int | None:
    """The pid in a lock file; None when there is none to read."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")[:32].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 2**31 else None


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: never taken over automatically
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _in_use(path: Path, holder: int | None) -> str:
    who = f"pid {holder}" if holder else "another process"
    return (
        f"{path.parent} is in use by another `sigmatune train` ({who}, holding {path.name}): wait for it to end "
        f"or stop it, or choose another --output-dir; if no run uses that folder, delete {path}"
    )
