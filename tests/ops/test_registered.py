"""Whoever uses sigmatune through its public API gets the fast paths: importing any public name registers
ops/'s backends with core's op, so an eager step on a GPU takes the fused kernel (r ≤ 128) or the band
kernels, never the plain torch GEMMs for want of an import (each case in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sigmatune.ops import transform_kernel

SOURCE = str(Path(__file__).resolve().parents[2] / "src")
CHOICES = """
import torch
from sigmatune.core.backends import BACKENDS, Call, choose
from sigmatune.core.structures.registry import structure_of
assert [b.name for b in BACKENDS] == ["transform", "band", "torch"], BACKENDS
def chosen(rank, structure, band, rows=False):
    call = Call("cuda", torch.bfloat16, rank, structure, band, False, rows=rows)
    backend = choose(call)
    return backend.name, backend.by_ops(call)
assert chosen(16, "diagonal", 0) == ("transform", False)
assert chosen(64, "band", 1) == ("transform", False)
assert chosen(2048, "band", 1) == ("band", False)
assert chosen(2048, "diagonal", 0) == ("band", True)  # the full spectrum: four torch ops
assert chosen(16, "dense", None) == ("torch", False)
assert chosen(16, "diagonal", 0, rows=True)[0] == "transform"  # adapters trained together: the fused kernel
assert chosen(2048, "diagonal", 0, rows=True)[0] == "band"  # its per-row dg by the band grad kernel
assert chosen(64, "band", 1, rows=True)[0] == "torch"
print("ok")
"""


@pytest.mark.skipif(transform_kernel.triton is None, reason="needs Triton")
@pytest.mark.parametrize(
    "entry",
    [
        "from sigmatune import get_sigma_model",
        "from sigmatune import SigmaModel",
        "from sigmatune import AutoSigmaModelForCausalLM",
        "from sigmatune import AdapterBank",
        "from sigmatune import SpectralLinear",
        "from sigmatune import SigmaConfig",
        "from sigmatune.model.sigma_model import get_sigma_model",
    ],
)
def test_the_public_api_registers_the_fast_paths(entry):
    done = subprocess.run(
        [sys.executable, "-c", entry + "\n" + CHOICES],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SOURCE, "PATH": ""},
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
