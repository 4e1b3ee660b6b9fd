"""A process that is killed while it saves an adapter, many times over: run by tests/formats/test_save_crash.py.

    python -m tests.crash_child WORKDIR

Writes WORKDIR/old and WORKDIR/new (two complete adapters of one model: the one on disk before a
save, and the one being saved). Then, for every kill, a forked process starts saving `new` over a
copy of `old` in WORKDIR/runs/<n> and dies by SIGKILL part-way:

    at a point   it kills itself at the p-th Python or C call of the save (sys.setprofile counts
                 them), for points spread over the whole save and around every write, fsync and rename;
    at a time    this process kills it after a random delay while it saves over and over.

WORKDIR/result.json lists the runs and how each process ended; the test checks every folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from sigmatune import SigmaConfig, get_sigma_model
from tests.models import randomize, tiny_llama

SPREAD_POINTS = 60  # kill points spread evenly over the save
TIMED_KILLS = 20  # kills at random times from outside
IO_CALLS = ("write", "fsync", "replace", "rename", "open", "close", "fdopen", "mkstemp", "save", "fchmod")


def main(workdir: Path) -> None:
    torch.set_num_threads(1)  # forked children must not inherit a thread pool mid-use
    model = get_sigma_model(tiny_llama(seed=0), SigmaConfig(rank=4))
    randomize(model, seed=1, scale=0.3)
    model.save_pretrained(workdir / "old")
    randomize(model, seed=2, scale=0.3)
    model.save_pretrained(workdir / "new")
    total, io_points = count_calls(model, workdir / "counting")
    points = sorted(
        {1 + i * (total - 1) // (SPREAD_POINTS - 1) for i in range(SPREAD_POINTS)}
        | {p + d for p in io_points for d in (-1, 0, 1) if 1 <= p + d <= total}
    )
    runs = [
        {"kind": "point", "point": p, **kill_at_point(model, workdir, i, p)} for i, p in enumerate(points)
    ]
    rng = random.Random(0)
    for _ in range(TIMED_KILLS):
        runs.append({"kind": "timed", **kill_at_time(model, workdir, len(runs), rng.uniform(0.0, 0.05))})
    (workdir / "result.json").write_text(json.dumps({"calls_per_save": total, "runs": runs}))


def count_calls(model, folder: Path) -> tuple[int, list[int]]:
    """How many profile events one save makes, and at which ones it calls the file-system functions."""
    seen, io_points = [0], []

    def count(frame, event, arg):
        seen[0] += 1
        if event == "c_call" and getattr(arg, "__name__", "") in IO_CALLS:
            io_points.append(seen[0])

    sys.setprofile(count)
    try:
        model.save_pretrained(folder)
    finally:
        sys.setprofile(None)
    return seen[0], io_points


def prepare(workdir: Path, n: int) -> Path:
    folder = workdir / "runs" / str(n)
    shutil.copytree(workdir / "old", folder)
    return folder


def kill_at_point(model, workdir: Path, n: int, point: int) -> dict:
    folder = prepare(workdir, n)
    pid = os.fork()
    if pid == 0:
        seen = [0]

        def die_at_point(frame, event, arg):
            seen[0] += 1
            if seen[0] == point:
                os.kill(os.getpid(), signal.SIGKILL)

        sys.setprofile(die_at_point)
        model.save_pretrained(folder)
        sys.setprofile(None)
        os._exit(0)  # the point lay beyond this save's calls
    return {"folder": str(folder), "status": ended(pid)}


def kill_at_time(model, workdir: Path, n: int, delay: float) -> dict:
    folder = prepare(workdir, n)
    pid = os.fork()
    if pid == 0:
        while True:  # save again and again until killed
            model.save_pretrained(folder)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    return {"folder": str(folder), "delay": delay, "status": ended(pid)}


def ended(pid: int) -> str:
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited {os.WEXITSTATUS(status)}"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
