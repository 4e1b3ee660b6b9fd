"""Saving is atomic: real processes killed (SIGKILL) at many points of save_pretrained, and at random
times, never leave a damaged adapter — every folder still loads, and equals the old adapter or the new
one, whole (tests/crash_child.py does the killing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from sigmatune import read_adapter
from sigmatune.formats.adapter_file import WEIGHTS_NAME, write_adapter
from sigmatune.formats.files import STALE_SECONDS
from tests.models import vectors

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crashes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("crashes")
    subprocess.run(
        [sys.executable, "-m", "tests.crash_child", str(workdir)], cwd=ROOT, check=True, timeout=600
    )
    return workdir, json.loads((workdir / "result.json").read_text())


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_at_any_point_of_a_save_leaves_the_old_or_the_new_adapter(crashes):
    workdir, result = crashes
    old, new = vectors(workdir / "old"), vectors(workdir / "new")
    assert not same(old, new)
    found = {"old": 0, "new": 0}
    for run in result["runs"]:
        with warnings.catch_warnings():  # killed between the two renames: the JSON copy is the old one
            warnings.simplefilter("ignore")
            loaded = vectors(Path(run["folder"]))  # raises if the adapter is damaged
        if same(loaded, old):
            found["old"] += 1
        else:
            assert same(loaded, new), f"{run}: the adapter on disk is neither the old nor the new one"
            found["new"] += 1
    killed = sum(run["status"] == "killed by signal 9" for run in result["runs"])
    print(
        f"\n{len(result['runs'])} saves killed part-way ({result['calls_per_save']} calls per save): {found}"
    )
    assert killed == len(result["runs"]) >= 100  # every kill point lay inside a save
    assert found["old"] > 0 and found["new"] > 0  # kills landed before and after the rename


def test_the_next_save_removes_what_killed_saves_left(crashes):
    workdir, result = crashes
    debris = [p for run in result["runs"] for p in Path(run["folder"]).glob(".*.tmp")]
    assert debris  # kills between creating and renaming a temp file leave one
    folder = debris[0].parent
    old = time.time() - STALE_SECONDS - 1
    for path in folder.glob(".*.tmp"):
        os.utime(path, (old, old))  # from a write long dead
    live = folder / f".{WEIGHTS_NAME}.inprogress.tmp"
    live.write_bytes(b"a write still going on elsewhere")
    write_adapter(folder, read_adapter(workdir / "new"))
    assert list(folder.glob(".*.tmp")) == [live]
