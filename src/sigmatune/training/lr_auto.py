"""lr "auto": a window of learning rates trained together, the one that does best on unseen examples chosen.

The structure's rule (settings.auto_lr) names a centre c for the structure and the model's depth; the
candidates are the 1-3-10 series' c/3, c, 3c and 10c (WINDOW). They train together (together_loop.py: one
batch holding each candidate's own batch, each row through its own adapter) for the job's whole schedule on
the training examples less a slice (slice_split), each is scored by its loss on that slice, and the centre is
kept unless another candidate's loss there is lower by more than MARGIN (then the lowest wins: decide); the
job's adapter then trains at that lr on the whole training split (the run an explicit --lr of it makes). The
held-out split the job reports is never used to choose.

Why this form (the quality suite's sweeps and lr-auto rows: benchmarks/results/quality.json and
quality_runs.json):
- one structure's best lr moves with the task by up to 30× on one model, more than any rule follows; the
  window spans what the suite's sweeps found around the rule (the best of a task is mostly at c/3 … 10c);
- a short run (a part of the schedule, its own warm-up and decay) favours a higher lr than the whole
  schedule does: the candidates train the whole one;
- a slice that shares groups (a document, an entity) with what the candidates train on favours the lr that
  fits those groups best; so the slice is a few examples (PER_GROUP) of each of many groups, and all of
  those groups' examples are set aside (and those that show them: an example's draws_on);
- the chosen candidate itself trained on less (and other) data than the whole split; trained again on all of it,
  lr auto's adapter is the one an explicit run at its lr makes, so its quality is that lr's;
- a slice of a hundred-odd examples ranks candidates a few percent apart by chance, and where the rule's centre
  was the best lr held out, the lowest on the slice was often another, far worse held out: so the centre stands
  unless the slice shows a clear gain (MARGIN).
Its cost: the candidates' rows go through the base model, so about len(WINDOW) runs and one more on a CPU;
far less on a GPU that a small model leaves idle.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass

from ..formats.checkpoint import FIX
from ..formats.files import AdapterFileError
from .data import Task, group_keys, trainable
from .loop import fit, log
from .scores import score
from .settings import TrainSettings, auto_lr, one_three
from .setup import model_blocks
from .together_loop import Member, fit_together, lr_name

WINDOW = (1 / 3.2, 1, 3.2, 10)  # the candidates, × the rule's centre, rounded onto the 1-3-10 series
SET_ASIDE_SHARE = 0.1  # of the training examples, at most (whole groups), for the slice
SLICE_MIN, SLICE_MAX, PER_GROUP = 16, 128, 4  # examples scored: in all, and of each group
MARGIN = 0.05  # how much lower than the centre's a candidate's slice loss must be for the candidate to win
RULE = (  # (records)
    "window c/3-10c, whole schedule, scored on a slice of unseen groups, the centre unless another is 5% "
    "lower there, trained again on all"
)


@dataclass
class Choice:
    lr: float  # the chosen one
    losses: dict[float, float | None]  # every candidate's loss on the slice (None: it failed)
    history: list[float]  # the job's training loss at the chosen lr, a step each (fit_auto's)
    slice: int = 0  # examples scored
    set_aside: int = 0  # examples not trained on (the slice's groups, whole)

    def record(self) -> dict:
        """What training_summary.json holds of the choice (the losses keyed by each lr as written)."""
        losses = {f"{lr:g}": loss for lr, loss in self.losses.items()}
        return {"losses": losses, "slice": self.slice, "set_aside": self.set_aside, "rule": RULE}


def candidates(centre: float) -> list[float]:
    """The window around the rule's centre: 1e-2 → [3e-3, 1e-2, 3e-2, 0.1] (none of 10 or more)."""
    rates = dict.fromkeys(one_three(centre * factor) for factor in WINDOW)
    return [lr for lr in rates if lr < 10]


def centre_of(config, model_config) -> float:
    """The rule's lr for an adapter's structure on a model of this depth (settings.auto_lr)."""
    return auto_lr(config.structure, config.band, model_blocks(model_config))


def slice_split(examples: list) -> tuple[list, list] | None:
    """(the examples the candidates train on, the slice they are scored on), both in the examples' order; or
    None where there are too few to spare a slice (fewer than 4 × SLICE_MIN, or groups so large that the slice
    would be under SLICE_MIN examples or set aside more than it leaves).

    From the last example back, each new group is set aside whole — until SET_ASIDE_SHARE of the examples
    are (at least SLICE_MIN), or the slice has SLICE_MAX — and its first PER_GROUP examples join the slice:
    many groups, a few of each; an example that draws on a group set aside (its `draws_on`: an exemplar that
    shows a slice's answer) is not trained on either. Examples without groups are groups of one: the slice is
    then the last SET_ASIDE_SHARE of them (SLICE_MIN to SLICE_MAX)."""
    count = len(examples)
    if count < 4 * SLICE_MIN:
        return None
    keys = group_keys(examples)
    members = defaultdict(list)  # group → its examples' indices
    for i, key in enumerate(keys):
        members[key].append(i)
    budget = max(SLICE_MIN, round(SET_ASIDE_SHARE * count))
    aside, scored, set_aside = set(), [], 0
    for key in reversed(keys):
        if set_aside >= budget or len(scored) >= SLICE_MAX:
            break
        if key not in aside:
            aside.add(key)
            set_aside += len(members[key])
            scored += members[key][:PER_GROUP]
    scored = sorted(scored)[-SLICE_MAX:]
    rest = [e for e, key in zip(examples, keys, strict=True) if trainable(e, key, aside)]
    if len(scored) < SLICE_MIN or len(rest) < count - len(rest):
        return None
    return rest, [examples[i] for i in scored]


def fit_auto(
    sigma_model,
    tokenizer,
    task: Task,
    settings: TrainSettings,
    device,
    path=None,
    before=None,
    resumed=None,
    packed: bool = False,
) -> Choice:
    """lr auto for the model's active adapter (settings.lr is "auto"; see the module docstring): choose() the lr,
    then train the active adapter at it on the whole training split (loop.fit: the run an explicit --lr of it
    makes). Checkpoints go to `path` every save_every steps in both phases; `resumed` continues either — one
    written by the last run holds the choice (chosen_lr, lr_auto), which is then not made again."""
    if resumed is not None and "lr_auto" in resumed.settings:
        choice = _recorded_choice(path, resumed.settings)
        log(f"lr auto: {choice.lr:g}, the lr the interrupted run chose")
    else:
        choice = choose(sigma_model, tokenizer, task, settings, device, path, resumed, packed)
        resumed = None
    log(f"lr auto: {choice.lr:g}, now trained on all {len(task.train)} training examples")
    recorded = {**dataclasses.asdict(settings), "chosen_lr": choice.lr, "lr_auto": choice.record()}
    run = dataclasses.replace(settings, lr=choice.lr)
    choice.history = fit(sigma_model, tokenizer, task, run, device, path, before, resumed, packed, recorded)
    return choice


def choose(
    sigma_model, tokenizer, task: Task, settings: TrainSettings, device, path=None, resumed=None, packed=False
) -> Choice:
    """lr auto's choice (no history): the candidates train together as adapters of the active adapter's
    config ("lr_<rate>"), each is scored on the slice, and they are deleted; the active adapter is left as it
    was. A candidate that fails (NaN, Inf) is dropped with a message; all failing is an error. Where the task is
    too small to spare a slice: the rule's lr, untried."""
    own = sigma_model.active_adapter
    config = sigma_model.peft_config[own]
    centre = centre_of(config, sigma_model.get_base_model().config)
    parts = slice_split(task.train)
    if parts is None:
        log(
            f"lr auto: {len(task.train)} training examples are too few to spare a slice; lr {centre:g} (the rule's)"
        )
        return Choice(centre, {}, [])
    trained_on = dataclasses.replace(task, train=parts[0], heldout=parts[1])
    members = [
        Member(lr_name(lr), trained_on, dataclasses.replace(settings, lr=lr)) for lr in candidates(centre)
    ]
    set_aside = len(task.train) - len(parts[0])
    log(
        f"lr auto: {', '.join(f'{m.settings.lr:g}' for m in members)} (around the rule's {centre:g}) trained "
        f"together on {len(parts[0])} examples, scored on {len(parts[1])} of the {set_aside} set aside"
    )
    for member in members:
        sigma_model.add_adapter(member.name, config)
    try:
        # the own adapter not trainable meanwhile (not checkpointed)
        sigma_model.set_adapter(members[0].name)
        recorded = dataclasses.asdict(settings)
        outcome = fit_together(sigma_model, tokenizer, members, device, path, resumed, recorded, packed)
        scoring = dataclasses.replace(settings, heldout=len(parts[1]), eval_accuracy=0)
        losses = {}
        for member in members:
            if member.name in outcome.failed:
                log(outcome.failed[member.name])
                losses[member.settings.lr] = None
                continue
            sigma_model.set_adapter(member.name)
            losses[member.settings.lr] = score(
                sigma_model, tokenizer, trained_on, scoring, device, packed
            ).loss
    finally:
        sigma_model.set_adapter(own)
        for member in members:
            sigma_model.delete_adapter(member.name)
    kept = decide(losses, centre)
    log("lr auto, loss on the slice: " + ", ".join(f"{lr:g} {_shown(v)}" for lr, v in losses.items()))
    reason = "the rule's: none is clearly lower" if kept == centre else "the lowest, clearly below the rule's"
    log(f"lr auto: {kept:g} kept ({reason} on the slice)")
    return Choice(kept, losses, [], len(parts[1]), set_aside)


def _recorded_choice(path, recorded: dict) -> Choice:
    """The choice a checkpoint of the last run holds, checked (a damaged one is refused by name)."""

    def number(value) -> bool:  # a finite JSON number, not a bool
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    made, lr = recorded.get("lr_auto"), recorded.get("chosen_lr")
    try:
        losses = {float(k): v for k, v in made["losses"].items()}
        counts = [made[k] for k in ("slice", "set_aside")]
    except (TypeError, KeyError, AttributeError, ValueError):
        losses, counts = None, []
    good = losses is not None and number(lr) and 0 < lr < 10
    if not good or not all(v is None or number(v) for v in losses.values()) or not all(map(_whole, counts)):
        raise AdapterFileError(path, "holds an lr auto choice that is not one lr auto writes", FIX)
    return Choice(float(lr), losses, [], *counts)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decide(losses: dict[float, float | None], centre: float) -> float:
    """The centre, unless the lowest finite loss on the slice is below the centre's by more than MARGIN (of the
    lowest) — then the lowest; the lowest too where the centre failed."""
    best = lowest(losses)
    at_centre = losses.get(centre)
    if at_centre is not None and math.isfinite(at_centre) and at_centre <= losses[best] * (1 + MARGIN):
        return centre
    return best


def lowest(losses: dict[float, float | None]) -> float:
    """The lr of the lowest finite loss; every one failed: an error naming them."""
    finished = {lr: loss for lr, loss in losses.items() if loss is not None and math.isfinite(loss)}
    if not finished:
        raise FloatingPointError(
            f"lr auto: every learning rate tried failed ({', '.join(f'{lr:g}' for lr in losses)}); "
            "give --lr a smaller one, or check the data"
        )
    return min(finished, key=finished.get)


def _shown(loss: float | None) -> str:
    return "failed" if loss is None else f"{loss:.4f}"
