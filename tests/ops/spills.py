"""Run tests/core/ptxas_check.py in a child process (no TRITON_INTERPRET: Triton compiles for sm_90 there)
and read back, per case, (the launch shape, bytes ptxas spilled a thread, its whole report)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys


def spills(cases: list) -> list[tuple[list, int, str]]:
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
