"""Training checkpoints: one safetensors file holding everything a run needs to go on exactly.

    <output_dir>/checkpoint.safetensors
        vector/<parameter>                 the trained vectors
        exp_avg/<parameter>, ...           the optimizer's state of each (AdamW: step, exp_avg, exp_avg_sq)
        rng                                torch's CPU random state
        metadata "sigmatune_checkpoint":   JSON {step, loss history, settings, score before training}
                 "sigmatune_sha256":       its checksum over that JSON and the tensors (files.checksummed)

One file, written atomically (files.py), so a crash or a kill at any moment leaves the previous
checkpoint or the new one. The data order depends on the seed alone and the learning rate on the step
alone, so a run resumed from step s computes the same numbers as one that never stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import CHECKSUM, AdapterFileError, atomic_save_tensors, check_digest, checksummed, load_tensors

CHECKPOINT_NAME = "checkpoint.safetensors"
KEY = "sigmatune_checkpoint"
RNG = "rng"


@dataclass
class Checkpoint:
    step: int  # optimizer steps done
    history: list[float]  # training loss of each of them
    settings: dict  # TrainSettings of the run, as a dict
    before: dict  # the score before training (not measured again on resume)
    tensors: dict[str, torch.Tensor]


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Checkpoint) -> None:
    """Write the trained vectors, the optimizer's state and the RNG with the run's state, atomically."""
    tensors = {}
    for name, parameter in _trained(model).items():
        tensors[f"vector/{name}"] = parameter.detach()
        for key, value in optimizer.state.get(parameter, {}).items():
            if torch.is_tensor(value):
                tensors[f"{key}/{name}"] = value.detach()
    tensors[RNG] = torch.get_rng_state()
    text = json.dumps(
        {"step": state.step, "history": state.history, "settings": state.settings, "before": state.before}
    )
    atomic_save_tensors(path, tensors, checksummed(KEY, text, tensors))


def load(path: Path) -> Checkpoint:
    """Read and check a checkpoint (checksum, fields, finite vectors); errors name the file."""
    tensors, metadata = load_tensors(path)
    if KEY not in metadata or CHECKSUM not in metadata:
        raise AdapterFileError(path, "is not a sigmatune training checkpoint")
    check_digest(path, metadata, KEY, tensors)
    info = json.loads(metadata[KEY])  # checked by the digest: it is what save() wrote
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(path, f"holds NaN or Inf in {bad[:3]}", "delete it and train from the start")
    return Checkpoint(info["step"], info["history"], info["settings"], info["before"], tensors)


def restore(
    path: Path, checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Put the checkpoint's vectors, optimizer state and RNG into a freshly built model and optimizer."""
    trained = _trained(model)
    by_parameter: dict[str, dict[str, torch.Tensor]] = {}  # parameter name → {kind: tensor}
    for key, value in checkpoint.tensors.items():
        if "/" in key:
            kind, name = key.split("/", 1)
            by_parameter.setdefault(name, {})[kind] = value
    if by_parameter.keys() != trained.keys() or any(
        "vector" not in by_parameter[name] or by_parameter[name]["vector"].shape != p.shape
        for name, p in trained.items()
    ):
        raise AdapterFileError(
            path,
            "was written for other trainable vectors than these settings make",
            "resume with the settings of the interrupted run (training_summary.json is not written yet; "
            "the checkpoint's settings are in its header)",
        )
    with torch.no_grad():
        for name, parameter in trained.items():
            saved = dict(by_parameter[name])
            parameter.copy_(saved.pop("vector"))
            optimizer.state[parameter] = {
                kind: value if kind == "step" else value.to(parameter.device) for kind, value in saved.items()
            }
    torch.set_rng_state(checkpoint.tensors[RNG])


def _trained(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
