"""sigmatune without Triton: what `bash scripts/train.sh` installs (the [cli] extra on a CPU torch) has no
Triton, so every module must import and the torch path must run without it. The test venv has Triton, so
a child process makes it unimportable (sys.modules["triton"] = None) before importing sigmatune."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed
    import torch
    import sigmatune
    from sigmatune import SigmaConfig, get_sigma_model
    from tests.models import tiny_llama, token_batch

    for module in pkgutil.walk_packages(sigmatune.__path__, "sigmatune."):
        if module.name.endswith(("__main__", ".server", ".routes", ".api_input")):
            continue  # the CLI's entry point; the [serve] extra's modules need fastapi, not installed here
        importlib.import_module(module.name)
    assert "triton" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
    for rank in ("full", 4):
        model = get_sigma_model(tiny_llama(), SigmaConfig(rank=rank, init="normal", init_std=0.1))
        ids = token_batch()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    print("ok")
    """
)


def test_imports_and_trains_without_triton():
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Triton not available" not in done.stderr  # no warning about what a CPU install never uses
    assert done.stdout.strip().endswith("ok")
