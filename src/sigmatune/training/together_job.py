"""The job that trains several adapters at once on one base model (together_loop.py), in two forms:

sweep     --lr a,b,c: one adapter per learning rate, all on the same batches; each is scored on the
          held-out split, the one with the lowest held-out loss is saved as the adapter (output_dir), and
          training_summary.json records every candidate's scores ("candidates") and the lr chosen.
manifest  --manifest jobs.jsonl, one {"name": ..., "data": ..., and any of MEMBER_SETTINGS} a line: one
          adapter per line, each on its own data with its own settings (the job's for the rest), each
          saved in output_dir/<name>/ with its own training_summary.json; the job's summary (every
          adapter's scores, and why any failed) in output_dir/training_summary.json.

An adapter that fails (a NaN or Inf: too high an lr, bad data) stops alone, with a message naming it; the
others train on and are saved. Checkpoints and --resume work as in the one-adapter job (job.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from ..formats.adapter_file import write_adapter
from ..formats.checkpoint import CHECKPOINT_NAME
from ..formats.files import atomic_write_json
from ..formats.model_card import write_model_card
from ..model.exchange import record_of
from ..model.sigma_model import get_sigma_model
from .data import load_task
from .loop import log, use_packing_for
from .lr_auto import centre_of
from .scores import base_score, format_score, score
from .settings import TRAJECTORY, TrainSettings, from_record
from .setup import Phases, fit_to_model, prepared
from .summary import SUMMARY_NAME
from .together_loop import Member, fit_together, lr_name

MEMBER_SETTINGS = ("lr", "steps", "batch_size", "seed", "warmup", "max_length", "heldout", "eval_accuracy")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a folder name anywhere, an adapter name (no ".")


def train(settings: TrainSettings, config, clock: Phases) -> dict:
    """The sweep or the manifest job, end to end (see the module docstring); returns the job's summary."""
    if settings.manifest:  # one spelling of its path, whatever the folder a resumed run starts in
        settings = dataclasses.replace(settings, manifest=str(Path(settings.manifest).expanduser().resolve()))
    entries = read_manifest(settings) if settings.manifest else None  # bad lines fail before any loading
    settings, config, model, tokenizer, device, dtype, resumed = prepared(settings, config)
    if entries:
        centre = centre_of(config, model.config)  # the lr of an adapter with lr "auto"
        members = _manifest_members(settings, entries, lambda s: fit_to_model(model, s, device), centre)
    else:
        members = _sweep_members(settings)
    if resumed is not None:
        _check_same_members(resumed, members)
    clock.lap("model and data")
    sigma_model = get_sigma_model(model, config, members[0].name)
    for member in members[1:]:
        sigma_model.add_adapter(member.name, config)
    sigma_model.set_adapter(members[0].name)
    first = members[0]
    # each member's batch a row
    packed = use_packing_for(sigma_model, tokenizer, first.task, settings, device, 8)
    trainable = sigma_model.get_nb_trainable_parameters()[0]
    log(f"{len(members)} adapters of {trainable:,} trainable numbers each, trained together")
    clock.lap("bases")
    scored = {}  # the base model's score, once per task and split
    for m in members:
        key = (id(m.task), m.settings.max_length)
        if key not in scored:
            scored[key] = base_score(sigma_model, tokenizer, m.task, m.settings, device, dtype, packed)
    before = {m.name: scored[id(m.task), m.settings.max_length] for m in members}
    clock.lap("score before")
    checkpoints = Path(settings.output_dir) / CHECKPOINT_NAME
    if resumed is not None:
        log(f"resuming at step {resumed.step} from {checkpoints}")
    recorded = dataclasses.asdict(settings)
    outcome = fit_together(sigma_model, tokenizer, members, device, checkpoints, resumed, recorded, packed)
    train_seconds = clock.lap("training")
    for message in outcome.failed.values():
        log(message)
    after = {}
    for member in members:
        if member.name not in outcome.failed:
            sigma_model.set_adapter(member.name)
            after[member.name] = score(sigma_model, tokenizer, member.task, member.settings, device, packed)
            log(f"{member.name}: {format_score(before[member.name])} → {format_score(after[member.name])}")
    clock.lap("score after")
    if not after:
        raise FloatingPointError(
            "every adapter failed, nothing was saved: " + " ".join(outcome.failed.values())
        )

    def summary_of(member: Member) -> dict:
        """What the one-adapter job records, for one member."""
        return {
            "settings": dataclasses.asdict(member.settings),
            "task": member.task.record(),
            "device": str(device),
            "trainable_parameters": trainable,
            "before": dataclasses.asdict(before[member.name]),
            "after": dataclasses.asdict(after[member.name]) if member.name in after else None,
            "loss_history": outcome.histories[member.name],
            "failed": outcome.failed.get(member.name),
        }

    records = {m.name: summary_of(m) for m in members}
    out = Path(settings.output_dir)
    if entries:
        for name in after:
            _save(sigma_model, name, out / name, records[name])
            atomic_write_json(out / name / SUMMARY_NAME, records[name])
        summary = {"settings": recorded, "device": str(device), "adapters": records}
    else:
        best = min(after, key=lambda name: after[name].loss)
        log(f"kept {best}: the lowest held-out loss of the {len(members)} learning rates")
        chosen = next(m for m in members if m.name == best)
        summary = {**records[best], "chosen_lr": chosen.settings.lr, "candidates": list(records.values())}
        summary["settings"] = recorded  # the sweep, as asked
        _save(sigma_model, best, out, summary)  # its summary, with the timings, written below
    clock.lap("saving")
    summary.update(
        train_seconds=round(train_seconds, 1),
        total_seconds=round(clock.total(), 1),
        seconds=clock.seconds,
        resumed_from_step=resumed.step if resumed else None,
    )
    atomic_write_json(out / SUMMARY_NAME, summary)
    checkpoints.unlink(missing_ok=True)
    _print_table(records)
    return summary


def _sweep_members(settings: TrainSettings) -> list[Member]:
    task = load_task(settings.data, settings.heldout, settings.seed)
    log(f"task {task.name}: {task.described()}")
    return [
        Member(lr_name(lr), task, dataclasses.replace(settings, lr=lr, manifest=""))
        for lr in settings.lr_candidates()
    ]


def _manifest_members(settings: TrainSettings, entries: list[dict], fitted, centre: float) -> list[Member]:
    """One member per manifest entry: the job's settings with the entry's own, fitted to the model; lr "auto"
    is the rule's lr, centre (a window of lrs for each adapter is a sweep's work: lr_auto.py)."""
    members = []
    for entry in entries:
        own = {key: entry[key] for key in MEMBER_SETTINGS if key in entry}
        member_settings = fitted(dataclasses.replace(settings, data=entry["data"], manifest="", **own))
        if member_settings.lr == "auto":
            member_settings = dataclasses.replace(member_settings, lr=centre)
        task = load_task(member_settings.data, member_settings.heldout, member_settings.seed)
        log(f"{entry['name']}: {task.described()}")
        members.append(Member(entry["name"], task, member_settings))
    return members


def read_manifest(settings: TrainSettings) -> list[dict]:
    """The manifest's entries, each checked: a name (a folder name, unique), a data file (relative to the
    manifest's folder) and settings of MEMBER_SETTINGS only."""
    path = Path(settings.manifest).expanduser()
    if not path.is_file():
        raise ValueError(f"--manifest {path}: no such file (one JSON object a line: name, data, settings)")
    entries, names = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{where}: not JSON ({str(err)[:80]})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "data" not in entry:
            raise ValueError(
                f'{where}: each line is {{"name": ..., "data": ..., and any of {MEMBER_SETTINGS}}}'
            )
        unknown = set(entry) - {"name", "data", *MEMBER_SETTINGS}
        if unknown:
            raise ValueError(
                f"{where}: {sorted(unknown)} cannot differ between adapters; allowed: {MEMBER_SETTINGS}"
            )
        if not NAME.fullmatch(entry["name"]) or entry["name"] in names:
            raise ValueError(
                f"{where}: name {entry['name']!r} must be unique, of letters, digits, '_' and '-'"
            )
        names.add(entry["name"])
        if not isinstance(entry["data"], str):
            raise ValueError(f"{where}: data {entry['data']!r:.60} is not a file name or a bigbench: task")
        data = Path(entry["data"]).expanduser()
        entry["data"] = str(data if data.is_absolute() or ":" in entry["data"] else path.parent / data)
        _check_entry(settings, entry, where)
        entries.append(entry)
    if not entries:
        raise ValueError(f"--manifest {path} lists no adapter")
    return entries


def _check_entry(settings: TrainSettings, entry: dict, where: str) -> None:
    """An entry's own settings: each of its setting's type (as a summary's are read) and range, one
    learning rate, no more steps than the job's."""
    own = {key: entry[key] for key in MEMBER_SETTINGS if key in entry}
    if isinstance(own.get("lr"), str):
        raise ValueError(f"{where}: lr {own['lr']!r} is not one learning rate (a number)")
    try:
        from_record({**dataclasses.asdict(settings), **own, "manifest": ""})
    except ValueError as err:
        raise ValueError(f"{where}: {str(err).removeprefix('settings.')}") from None
    if own.get("steps", 0) > settings.steps:
        raise ValueError(
            f"{where}: adapter {entry['name']!r} asks for {own['steps']} steps, more than the job's --steps "
            f"{settings.steps}: raise --steps (the most any adapter takes)"
        )


def _check_same_members(resumed, members: list[Member]) -> None:
    """A resumed run trains the same adapters with the same settings, each (the job's were checked)."""
    saved = resumed.settings.get("adapters", {})
    if not isinstance(saved, dict) or set(saved) != {m.name for m in members}:
        raise ValueError(
            f"--resume: the checkpoint trained the adapters {sorted(saved)}, not {[m.name for m in members]}; "
            "resume with the same manifest or learning rates"
        )
    for member in members:
        before = saved[member.name].get("settings", {}) if isinstance(saved[member.name], dict) else {}
        now = dataclasses.asdict(member.settings)
        differ = [f"{f} {before.get(f)!r} → {now[f]!r}" for f in TRAJECTORY if before.get(f) != now[f]]
        if differ:
            raise ValueError(
                f"--resume: adapter {member.name!r} was trained with other settings ({'; '.join(differ)}); "
                "resume with the same manifest"
            )


def _save(sigma_model, name: str, directory: Path, summary: dict) -> None:
    """One adapter and its model card (with the scores `summary` records) into directory."""
    record = record_of(sigma_model, name, False)
    write_adapter(directory, record)
    write_model_card(directory, record, summary)


def _print_table(records: dict) -> None:
    print(f"\n{'adapter':<20}{'lr':>10}{'before':>10}{'after':>10}  exact match")
    for name, r in records.items():
        after = r["after"]
        if after is None:
            print(f"{name:<20}{r['settings']['lr']:>10g}{r['before']['loss']:>10.4f}{'failed':>10}")
            continue
        accuracy = "" if after["accuracy"] is None else f"{100 * after['accuracy']:.1f}%"
        print(
            f"{name:<20}{r['settings']['lr']:>10g}{r['before']['loss']:>10.4f}{after['loss']:>10.4f}  {accuracy}"
        )
