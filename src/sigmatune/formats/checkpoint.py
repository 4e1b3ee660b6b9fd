"""Training checkpoints: one safetensors file holding everything a run needs to go on exactly.

    <output_dir>/checkpoint.safetensors
        vector/<parameter>                 the trained vectors
        exp_avg/<parameter>, ...           the optimizer's state of each (AdamW: step, exp_avg, exp_avg_sq)
        rng                                torch's CPU random state
        metadata "sigmatune_checkpoint":   JSON {step, loss history, settings, score before training}
                 "sigmatune_sha256":       its checksum over that JSON and the tensors (files.checksummed)

One file, written atomically (files.py), so a crash or a kill at any moment leaves the previous
checkpoint or the new one. Reading checks it as it checks an adapter: the checksum, then every field
(types, ranges, shapes, dtypes, finite values) against what save() writes, so that a damaged or forged
checkpoint is refused by name instead of resuming as something else. The data order depends on the seed alone and the learning rate on the step
alone, so a run resumed from step s computes the same numbers as one that never stopped.
"""

from __future__ import annotations

import json
import math
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
    """Read and check a checkpoint: its checksum, then every field (types, ranges, shapes, finite values)
    against what save() writes; anything off is an AdapterFileError naming the file and the field."""
    tensors, metadata = load_tensors(path)
    if KEY not in metadata or CHECKSUM not in metadata:
        raise AdapterFileError(path, "is not a sigmatune training checkpoint", FIX)
    check_digest(path, metadata, KEY, tensors)
    info = _run_state(path, metadata[KEY])
    _check_tensors(path, tensors, info["step"])
    return Checkpoint(info["step"], info["history"], info["settings"], info["before"], tensors)


FIX = "delete it to train from the start, or train without --resume into another --output-dir"
KINDS = ("vector", "exp_avg", "exp_avg_sq", "step")  # per parameter: its vector, then AdamW's state
BEFORE = {"loss", "accuracy", "examples"}  # the score before training (training/evaluate.Score)


def _run_state(path: Path, text: str) -> dict:
    """The checkpoint's JSON {step, history, settings, before}, each field checked."""
    try:
        info = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise AdapterFileError(
            path, f"holds a run state that is not valid JSON ({str(err)[:80]})", FIX
        ) from None
    _require(path, "run state", info, isinstance(info, dict), "a JSON object")
    settings = info.get("settings")
    _require(path, "settings", settings, isinstance(settings, dict), "an object of the run's settings")
    steps = settings.get("steps")
    _require(path, "settings.steps", steps, _whole(steps) and steps >= 1, "a whole number of steps ≥ 1")
    step = info.get("step")
    wanted = f"a whole number from 0 to {steps - 1} (the steps of a {steps}-step run done before it stopped)"
    _require(path, "step", step, _whole(step) and 0 <= step < steps, wanted)
    history = info.get("history")
    good = isinstance(history, list) and len(history) == step and all(map(_loss, history))
    _require(path, "history", history, good, f"a list of {step} finite non-negative losses, one a step")
    _check_before(path, info.get("before"))
    return info


def _check_before(path: Path, before) -> None:
    """The score before training: {} (not measured), or {loss, accuracy, examples} of sound values."""
    _require(
        path,
        "before",
        before,
        isinstance(before, dict) and set(before) in (set(), BEFORE),
        f"an object with the fields {sorted(BEFORE)}, or an empty one",
    )
    if before:
        accuracy, examples = before["accuracy"], before["examples"]
        share = accuracy is None or (_number(accuracy) and 0 <= accuracy <= 1)
        _require(path, "before.loss", before["loss"], _loss(before["loss"]), "a finite non-negative loss")
        _require(path, "before.accuracy", accuracy, share, "a share from 0 to 1, or null")
        _require(path, "before.examples", examples, _whole(examples) and 1 <= examples < 2**53, "a count ≥ 1")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], step: int) -> None:
    """The RNG state, and per parameter its vector and AdamW's state at this step (none at step 0)."""
    for key in tensors:
        kind, _, name = key.partition("/")
        if key != RNG and (kind not in KINDS or not name):
            raise AdapterFileError(path, f"holds a tensor {key[:80]!r} that no checkpoint has", FIX)
    _check_rng(path, tensors.get(RNG))
    for name, parts in _by_parameter(tensors).items():
        _check_parameter(path, name, parts, step)


def _by_parameter(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Parameter name → {kind: tensor} from the tensors named <kind>/<parameter>."""
    by_parameter: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if "/" in key:
            kind, name = key.split("/", 1)
            by_parameter.setdefault(name, {})[kind] = value
    return by_parameter


def _check_rng(path: Path, rng: torch.Tensor | None) -> None:
    expected = torch.get_rng_state()
    good = rng is not None and rng.dtype == expected.dtype and rng.shape == expected.shape
    _require(
        path,
        "rng",
        None if rng is None else f"{rng.dtype} {list(rng.shape)}",
        good,
        f"torch's CPU random state ({expected.dtype} {list(expected.shape)})",
    )
    try:
        torch.Generator().set_state(rng)
    except RuntimeError as err:
        raise AdapterFileError(path, f"holds a bad 'rng' ({str(err)[:80]})", FIX) from None


def _check_parameter(path: Path, name: str, parts: dict[str, torch.Tensor], step: int) -> None:
    """A parameter's vector (floating point, finite) and AdamW's state: exp_avg and exp_avg_sq (≥ 0) of the
    vector's shape and dtype, and its step count (a scalar equal to the checkpoint's step)."""
    vector = parts.get("vector")
    _require(
        path,
        f"vector/{name}",
        _describe(vector),
        vector is not None and vector.is_floating_point(),
        "a floating-point vector",
    )
    state = set(parts) - {"vector"}
    wanted = set(KINDS) - {"vector"} if step else set()
    _require(
        path, f"optimizer state of {name}", sorted(state), state == wanted, f"{sorted(wanted)} at step {step}"
    )
    for kind in ("exp_avg", "exp_avg_sq") if step else ():
        value = parts[kind]
        negative = kind == "exp_avg_sq" and bool((value < 0).any())  # a running mean of squares
        good = value.dtype == vector.dtype and value.shape == vector.shape and not negative
        wanted = f"{_describe(vector)} as its vector" + (", none negative" if kind == "exp_avg_sq" else "")
        _require(path, f"{kind}/{name}", _describe(value), good, wanted)
    if step:
        count = parts["step"]
        good = count.shape == () and count.dtype in (torch.float32, torch.float64) and float(count) == step
        _require(path, f"step/{name}", _describe(count), good, f"the float scalar {step}: AdamW's steps done")
    for kind, value in parts.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterFileError(path, f"holds NaN or Inf in {kind}/{name}", FIX)


def _require(path: Path, field: str, value, good: bool, wanted: str) -> None:
    """Refuse the file unless good: the error names the field, its value and what was expected."""
    if not good:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise AdapterFileError(path, f"holds a bad {field!r} ({shown}): expected {wanted}", FIX)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    """A finite JSON number (a bool is not one; an integer beyond a float's exact range is refused)."""
    return (isinstance(value, float) and math.isfinite(value)) or (_whole(value) and abs(value) < 2**53)


def _loss(value) -> bool:
    return _number(value) and value >= 0


def _describe(tensor: torch.Tensor | None) -> str | None:
    return None if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"


def restore(
    path: Path, checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Put the checkpoint's vectors, optimizer state and RNG into a freshly built model and optimizer."""
    trained = _trained(model)
    by_parameter = _by_parameter(checkpoint.tensors)  # load() checked each: a vector, AdamW's state
    if by_parameter.keys() != trained.keys() or any(
        (by_parameter[name]["vector"].shape, by_parameter[name]["vector"].dtype) != (p.shape, p.dtype)
        for name, p in trained.items()
    ):
        raise AdapterFileError(
            path,
            "was written for other trainable vectors than these settings make",
            "resume with the settings of the interrupted run (training_summary.json is not written yet; "
            "the checkpoint's settings are in its header), or " + FIX,
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
