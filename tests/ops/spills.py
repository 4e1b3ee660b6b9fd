"""Run tests/core/ptxas_check.py in a child process (no TRITON_INTERPRET: Triton compiles for sm_90 there)
and read back, per case, (the launch shape, bytes ptxas spilled a thread, its whole report).

How many bytes ptxas spills is one compiler's register allocation: Triton 3.8.0 spills 8 bytes where
3.9.0 spills none. So these checks run against the Triton (and the ptxas it ships) pinned in
scripts/constraints.txt only, which the test command installs, and skip with both versions named
elsewhere; SIGMATUNE_CHECK_SPILLS=1 runs them with any Triton (scripts/test-newest.sh sets it, so a
newer Triton is checked before it is pinned)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

CONSTRAINTS = Path(__file__).parents[2] / "scripts" / "constraints.txt"


def skip_unless_pinned_triton() -> None:
    pinned = re.search(r"(?m)^triton==(\S+)$", CONSTRAINTS.read_text()) if CONSTRAINTS.exists() else None
    pinned, installed = pinned[1] if pinned else "(none)", metadata.version("triton")
    own_ptxas = ", ".join(sorted(k for k in os.environ if k.startswith("TRITON_PTXAS")))
    if os.environ.get("SIGMATUNE_CHECK_SPILLS") == "1" or (pinned == installed and not own_ptxas):
        return
    pytest.skip(
        f"register allocation is checked with the pinned Triton {pinned} (scripts/constraints.txt) only; "
        f"this is Triton {installed}{f' with {own_ptxas} set' if own_ptxas else ''} "
        "(SIGMATUNE_CHECK_SPILLS=1 runs it anyway)"
    )


def spills(cases: list) -> list[tuple[list, int, str]]:
    skip_unless_pinned_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tests.ops.ptxas_check", json.dumps(cases)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(reports) == len(cases)
    found = []
    for shape, report in reports:
        spilled = re.search(r"\b(\d+) bytes spill stores", report)
        assert "registers" in report and spilled, report
        found.append((shape, int(spilled[1]), report))
    return found
