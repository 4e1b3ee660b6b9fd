"""Where work runs: the device and dtype a setting names, and how much memory is free there."""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """ "auto" picks CUDA when present; dtype "auto" is bfloat16 on CUDA and float32 on CPU."""
    chosen = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu")
    )
    if dtype == "auto":
        return chosen, torch.bfloat16 if chosen.type == "cuda" else torch.float32
    return chosen, getattr(torch, dtype)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device (CUDA), or available to this process (CPU, from /proc/meminfo); None
    when the platform does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = next((line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
    return int(found) * 1024 if found else None
