"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels then run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own basis cache folder (never the user's ~/.cache)."""
    folder = tmp_path_factory.mktemp("sigma-cache")
    monkeypatch.setenv("SIGMATUNE_CACHE", str(folder))
    return folder / "bases"
