"""Data-parallel training of an adapted model on several processes: DDP or FSDP2, with accumulation.

    runner = distribute(sigma_model, "ddp" | "fsdp2", world, dtype, device)
    for micro-batch:  with gradient_sync(runner, mode, last_micro_batch, world): loss.backward()

Every rank builds the same model; the SVD bases are computed on rank 0 and broadcast (core/svd.py), so all
ranks hold identical bases. Only the vectors are trained, so DDP reduces a few thousand numbers per
step; FSDP2 shards the frozen base too (one unit per decoder layer and one for the root), for models
whose weights do not fit one device. save_pretrained is collective (model/sigma_model.py): every rank calls it.
End each process with leave() (see there for why).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

MODES = ("ddp", "fsdp2")


def distribute(model: torch.nn.Module, mode: str, world: int, dtype: str, device: torch.device):
    """The module to call: DDP around the model, or the model with FSDP2 on each decoder layer and
    the root (dtype "bfloat16": bf16 parameters and fp32 gradient reduction). One process without a
    process group: the model itself (with one, it is wrapped too, so that 1 and N compute alike)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        return model
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if dtype == "bfloat16"
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model, wrapped or not: the first ModuleList named `layers`
    (Llama, Mistral, Qwen, ...) or `h` (GPT-2) in the module tree."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("layers", "h") and isinstance(module, torch.nn.ModuleList):
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def gradient_sync(runner, mode: str, last: bool, world: int):
    """Gradient accumulation: reduce across processes only on the last micro-batch of a step."""
    if world == 1 or last:
        if mode == "fsdp2" and world > 1:
            runner.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if mode == "ddp":
        return runner.no_sync()
    runner.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def split(items: list[int], parts: int) -> list[list[int]]:
    """items in `parts` consecutive chunks (the last may be shorter)."""
    size = -(-len(items) // parts)
    return [items[i : i + size] for i in range(0, len(items), size)]


def leave(code: int = 0) -> NoReturn:
    """End a process of a distributed job: wait for every rank, tear down the process group and exit at
    once, without Python's destructors (files must be closed: save_pretrained's are).

    Why not a normal exit: the DDP Reducer, freed when the script ends, destroys the gloo process group
    while holding the GIL and waits for gloo's worker threads, and a worker thread that is still freeing
    a tensor Python gave up waits for the GIL: a rare hang at exit under load (pytorch/pytorch#56297;
    seen in this project's CPU tests: one rank stuck in ~ProcessGroupGloo after all its work was done).
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
