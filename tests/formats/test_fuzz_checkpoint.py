"""Forged training checkpoints: every field of a real checkpoint (made by a real AdamW run and the real
save) changed to a wrong type or a value out of range, written back with its checksum recomputed, then
read and restored onto a real model and optimizer as `--resume` does. Each must be refused with an
AdapterFileError that names the file, the field and the fix, within a time limit and without a memory
blow-up, leaving the model as it was; the few edits that change nothing a run reads (marked) may instead
restore exactly what the original restores.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import warnings
from pathlib import Path

import pytest
import torch

from sigmatune import SigmaConfig, get_sigma_model
from sigmatune.formats import checkpoint
from sigmatune.formats.files import AdapterFileError
from sigmatune.training.settings import TrainSettings
from tests.checkpoints import read_checkpoint, write_forged
from tests.formats.test_fuzz_files import time_limit
from tests.models import tiny_llama, token_batch

STEP, STEPS = 3, 10  # the original: 3 AdamW steps done of a 10-step run
SECONDS_PER_FILE = 10
MEMORY_GROWTH_LIMIT = 256 * 2**20


def trained(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A checkpoint of 3 real AdamW steps of a tiny model, written by checkpoint.save."""
    path = tmp_path_factory.mktemp("original") / checkpoint.CHECKPOINT_NAME
    model = get_sigma_model(tiny_llama(seed=0), SigmaConfig(rank=4))
    optimizer = torch.optim.AdamW(trained(model), lr=0.05)
    history = []
    for step in range(STEP):
        loss = model(token_batch(seed=step), labels=token_batch(seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(round(float(loss.detach()), 4))
    settings = dataclasses.asdict(TrainSettings(steps=STEPS, rank=4, lr=0.05))
    before = {"loss": 4.5, "accuracy": 0.25, "examples": 20}
    checkpoint.save(path, model, optimizer, checkpoint.Checkpoint(STEP, history, settings, before, {}))
    return path


@pytest.fixture(scope="module")
def target():
    """The model every case is restored onto (a refused case must leave its vectors as they were)."""
    return get_sigma_model(tiny_llama(seed=0), SigmaConfig(rank=4))


# ---- the cases: (label, the field the error must name, edit of (info, tensors), may be harmless) ----------


def info_cases(name: str) -> list:
    """Edits of the JSON: step, history, settings, before, and the JSON itself."""
    cases = []

    def case(label, field, edit, harmless=False):
        cases.append((label, field, edit, harmless))

    def put(*keys_and_value):
        *keys, value = keys_and_value

        def edit(info, tensors):
            where = info
            for key in keys[:-1]:
                where = where[key]
            where[keys[-1]] = value

        return edit

    def drop(*keys):
        def edit(info, tensors):
            where = info
            for key in keys[:-1]:
                where = where[key]
            where.pop(keys[-1])

        return edit

    for value in (10**9, -5, STEPS, STEPS + 1, 1.5, "3", True, None, [3], 10**30, float("nan")):
        case(f"step {value!r}", "step", put("step", value))
    case("step missing", "step", drop("step"))
    case("step 0 with optimizer state", "step", put("step", 0), False)
    case(
        "step 2 (history of 2) but the optimizer's step 3",
        "step",
        lambda info, t: info.update(step=2, history=info["history"][:2]),
    )
    for label, value in [
        ("shorter than step", [1.0, 2.0]),
        ("longer than step", [1.0, 2.0, 3.0, 4.0]),
        ("with NaN", [1.0, float("nan"), 2.0]),
        ("with Infinity", [1.0, float("inf"), 2.0]),
        ("with a negative loss", [1.0, -2.0, 2.0]),
        ("with text", [1.0, "2.0", 2.0]),
        ("with null", [1.0, None, 2.0]),
        ("with a bool", [1.0, True, 2.0]),
        ("with a list", [1.0, [2.0], 2.0]),
        ("an object", {"0": 1.0}),
        ("text", "1, 2, 3"),
        ("a number", 3),
    ]:
        case(f"history {label}", "history", put("history", value))
    case("history missing", "history", drop("history"))
    for label, value in [("a list", [1, 2]), ("text", "steps=10"), ("null", None), ("a number", 10)]:
        case(f"settings {label}", "settings", put("settings", value))
    case("settings missing", "settings", drop("settings"))
    for value in (0, -1, "10", 10.0, True, None, 2):
        case(f"settings.steps {value!r}", "steps", put("settings", "steps", value))
    case("settings.steps missing", "steps", drop("settings", "steps"))
    case("settings.lr changed", "lr", put("settings", "lr", 0.5), harmless=True)  # the job refuses it
    case("settings with an unknown field", "-", put("settings", "evil", "rm -rf /"), harmless=True)
    for label, value in [("a list", [4.5, 0.25, 20]), ("text", "4.5"), ("null", None)]:
        case(f"before {label}", "before", put("before", value))
    case("before missing", "before", drop("before"))
    case("before with an unknown field", "before", put("before", "evil", 1))
    case("before without loss", "before", drop("before", "loss"))
    for field, values in {
        "loss": (float("nan"), float("inf"), -1.0, "4.5", None, True, [4.5]),
        "accuracy": (1.5, -0.1, float("nan"), "0.25", True, [0.25]),
        "examples": (0, -3, 2.5, "20", None, True, 10**30),
    }.items():
        for value in values:
            case(f"before.{field} {value!r}", field, put("before", field, value))
    case("before.accuracy null (no prompts)", "-", put("before", "accuracy", None), harmless=True)
    case("an unknown field", "-", put("evil", {"nested": [1, 2]}), harmless=True)
    for label, text in [
        ("a JSON list", "[1, 2, 3]"),
        ("JSON null", "null"),
        ("a JSON number", "5"),
        ("not JSON", "{not json"),
        ("empty", ""),
        ("nested 100,000 deep", "[" * 100_000 + "]" * 100_000),
        ("an object nested 100,000 deep", '{"a":' * 100_000 + "1" + "}" * 100_000),
        ("a 100,000-digit step", '{"step": ' + "9" * 100_000 + "}"),
    ]:
        case(f"the state {label}", "state", lambda info, t, text=text: text)
    return cases


def tensor_cases(name: str) -> list:
    """Edits of the tensors: the RNG, the vectors, AdamW's state, and tensors of nothing."""
    cases = []

    def case(label, field, edit, harmless=False):
        cases.append((label, field, edit, harmless))

    def put(key, make):
        return lambda info, t: t.__setitem__(key, make(t[key]) if key in t else make(None))

    def drop(key):
        return lambda info, t: t.pop(key)

    rng = "rng"
    for label, make in [
        ("as float32", lambda x: x.float()),
        ("as int64", lambda x: x.long()),
        ("shorter", lambda x: x[:-8]),
        ("2-D", lambda x: x.reshape(2, -1)),
        ("empty", lambda x: x[:0]),
        ("an invalid mt19937 state", lambda x: torch.full_like(x, 255)),
    ]:
        case(f"rng {label}", rng, put(rng, make))
    case("rng missing", rng, drop(rng))
    for kind in ("vector", "exp_avg", "exp_avg_sq", "step"):
        key = f"{kind}/{name}"
        case(f"{kind} missing", kind, drop(key))
        for label, make in [
            ("as float64", lambda x: x.double()),
            ("as int64", lambda x: x.long()),
            ("as bool", lambda x: x.bool()),
            ("longer", lambda x: torch.zeros(x.numel() + 1)),
            ("2-D", lambda x: x.reshape(1, -1)),
            ("with NaN", lambda x: torch.full_like(x, float("nan"))),
            ("with Inf", lambda x: torch.full_like(x, float("inf"))),
        ]:
            harmless = (kind, label) == ("step", "as float64")  # AdamW's own under a float64 default
            case(f"{kind} {label}", kind, put(key, make), harmless)
    case("exp_avg_sq negative", "exp_avg_sq", put(f"exp_avg_sq/{name}", lambda x: -1 - x))
    for label, value in [("2", 2.0), ("-3", -3.0), ("10^9", 1e9), ("0", 0.0)]:
        case(f"the optimizer's step {label}", "step", put(f"step/{name}", lambda x, v=value: torch.tensor(v)))
    case("an unknown optimizer state", "momentum", put(f"momentum/{name}", lambda x: torch.zeros(4)))
    case("a tensor of nothing", "junk", put("junk", lambda x: torch.zeros(1 << 20)))
    stray = "model.layers.9.mlp.sigma_adapters.default.vector"  # a parameter the model lacks
    case("a vector of no parameter", stray, put(f"vector/{stray}", lambda x: torch.zeros(4)))
    case("a parameter without its vector", stray, put(f"exp_avg/{stray}", lambda x: torch.zeros(4)))
    case("a whole parameter too many", "other trainable vectors", lambda info, t: t.update(
        {f"{kind}/{stray}": t[f"{kind}/{name}"].clone() for kind in ("vector", "exp_avg", "exp_avg_sq", "step")}
    ))  # fmt: skip
    return cases


# ---- running a case ------------------------------------------------------------------------------------


def resume_onto(model, path: Path) -> torch.optim.Optimizer:
    """What --resume does with a checkpoint: read it, then put it into the model and a fresh AdamW."""
    optimizer = torch.optim.AdamW(trained(model), lr=0.05)
    with time_limit(SECONDS_PER_FILE), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint.restore(path, checkpoint.load(path), model, optimizer)
    return optimizer


def state_of(model, optimizer) -> list[torch.Tensor]:
    """Everything a resumed run goes on from: the vectors, AdamW's state, the RNG."""
    parts = [p.detach().clone() for p in trained(model)]
    for p in trained(model):
        parts += [optimizer.state[p][k].clone() for k in sorted(optimizer.state[p])]
    return [*parts, torch.get_rng_state()]


def run_cases(cases, original: Path, target, tmp_path: Path) -> dict[str, int]:
    rng = torch.get_rng_state()
    reference = state_of(target, resume_onto(target, original))
    info, tensors = read_checkpoint(original)
    outcomes = {"refused": 0, "harmless": 0}
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for i, (label, field, edit, may_be_harmless) in enumerate(cases):
        forged_info, forged = json.loads(json.dumps(info)), {k: v.clone() for k, v in tensors.items()}
        replaced = edit(forged_info, forged)
        path = tmp_path / f"case{i}" / checkpoint.CHECKPOINT_NAME
        write_forged(path, replaced if isinstance(replaced, str) else forged_info, forged)
        vectors = [p.detach().clone() for p in trained(target)]
        try:
            optimizer = resume_onto(target, path)
        except AdapterFileError as err:
            message = str(err)
            assert str(path) in message, f"{label}: the error does not name the file: {message}"
            assert field in message, f"{label}: the error does not name the field {field!r}: {message}"
            assert "delete" in message or "--resume" in message, f"{label}: no fix given: {message}"
            assert all(torch.equal(a, b) for a, b in zip(vectors, trained(target), strict=True)), label
            outcomes["refused"] += 1
            continue
        assert may_be_harmless, f"{label}: a forged checkpoint was accepted"
        got = state_of(target, optimizer)
        assert len(got) == len(reference) and all(map(torch.equal, got, reference)), label
        outcomes["harmless"] += 1
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
    assert growth < MEMORY_GROWTH_LIMIT, f"peak memory grew by {growth / 2**20:.0f} MiB"
    torch.set_rng_state(rng)
    return outcomes


def first_parameter(target) -> str:
    return next(name for name, p in target.named_parameters() if p.requires_grad)


# ---- the tests ----------------------------------------------------------------------------------------


def test_the_original_resumes(original, target):
    optimizer = resume_onto(target, original)
    assert all(float(optimizer.state[p]["step"]) == STEP for p in trained(target))
    loaded = checkpoint.load(original)
    assert (loaded.step, len(loaded.history), loaded.settings["steps"]) == (STEP, STEP, STEPS)


@pytest.mark.parametrize("family", ["info", "tensors"])
def test_every_forged_checkpoint_is_refused_by_file_and_field(family, original, target, tmp_path):
    make = {"info": info_cases, "tensors": tensor_cases}[family]
    cases = make(first_parameter(target))
    outcomes = run_cases(cases, original, target, tmp_path)
    print(f"\nforged checkpoints ({family}): {len(cases)} cases, {outcomes}")
    assert outcomes["refused"] + outcomes["harmless"] == len(cases)
    assert outcomes["harmless"] <= sum(harmless for *_, harmless in cases)
