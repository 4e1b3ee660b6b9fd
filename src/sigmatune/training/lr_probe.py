"""lr "auto": a short range test before the job trains.

The structure's rule (settings.auto_lr) names a centre c; its neighbours on the 1-3-10 series, c/3 and 3c, and
c itself each train for PROBE_SHARE of the job's steps (a warm-up and cosine of their own, on the same batches,
all three at once: together_loop) on the training examples less a slice, and are scored by their loss on that
slice. The winner is the smallest lr within PROBE_TOLERANCE of the lowest loss (a short run favours a high lr).
Where the winner is at an edge, one more lr past it is probed (once). The job then trains from the start at the
winner. Nothing is tuned on the held-out split that the job reports.

Why not a rule alone: the best lr moves with the task by 3× and more for one structure and model (SmolLM2's
diagonal: 1e-2 on the default job, 3e-2 or higher on the quality suite's pronunciation task), which a rule cannot
follow. How often the probe picks the lr a full sweep would is what the quality suite's lr-auto rows measure
(benchmarks/quality.py; the probe's losses in results/quality_runs.json). It costs about PROBE_SHARE × (3 + 1) of
the training on a CPU (every candidate's rows go through the base model), less on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from .data import Task, split_off
from .loop import log
from .scores import score
from .settings import TrainSettings, one_three
from .together_loop import Member, fit_together

PROBE_SHARE = 0.2  # of the job's steps, for each candidate
PROBE_MIN_STEPS = 10
SLICE_SHARE, SLICE_MIN, SLICE_MAX = 0.1, 16, 128  # the training examples the probe scores on, not trains on
PROBE_TOLERANCE = 0.02  # a smaller lr within 2% of the lowest probe loss wins
SERIES_STEP = 3.2  # one step along the 1-3-10 series (one_three rounds c · 3.2 to 3c, c / 3.2 to c / 3)


@dataclass
class Probe:
    lr: float  # the winner
    losses: dict[float, float | None]  # every lr probed → its loss on the slice (None: it diverged)

    def by_name(self) -> dict[str, float | None]:
        """The losses keyed by each lr as written ("0.003"): a JSON object."""
        return {f"{lr:g}": loss for lr, loss in self.losses.items()}


def choose_lr(centre: float, trial: Callable[[list[float]], dict[float, float | None]]) -> Probe:
    """The winner (_winner) among centre and its 1-3-10 neighbours, and, where it is at an edge, the next lr
    past it. trial(lrs) → each lr's loss, None for one that diverged. All diverged: an error."""
    losses = trial([one_three(centre / SERIES_STEP), centre, one_three(centre * SERIES_STEP)])
    best, finished = _winner(losses), sorted(_finished(losses))
    if best is not None and len(finished) > 1 and best in (finished[0], finished[-1]):
        beyond = one_three(best / SERIES_STEP if best == finished[0] else best * SERIES_STEP)
        if beyond not in losses and beyond < 10:
            losses |= trial([beyond])
            best = _winner(losses)
    if best is None:
        raise FloatingPointError(
            f"lr auto: every learning rate probed diverged ({', '.join(f'{lr:g}' for lr in losses)}); "
            "give --lr a smaller one, or check the data"
        )
    return Probe(best, losses)


def _finished(losses: dict[float, float | None]) -> dict[float, float]:
    """The lrs that did not diverge, with their losses."""
    return {lr: loss for lr, loss in losses.items() if loss is not None and math.isfinite(loss)}


def _winner(losses: dict[float, float | None]) -> float | None:
    """The smallest lr whose loss is within PROBE_TOLERANCE of the lowest; None where every one diverged."""
    finished = _finished(losses)
    if not finished:
        return None
    lowest = min(finished.values())
    return min(lr for lr, loss in finished.items() if loss <= lowest * (1 + PROBE_TOLERANCE))


def probe_steps(steps: int) -> int:
    """The steps each candidate trains: PROBE_SHARE of a run's steps, at least PROBE_MIN_STEPS."""
    return max(PROBE_MIN_STEPS, round(PROBE_SHARE * steps))


def probe_split(examples: list) -> tuple[list, list] | None:
    """(the examples the probe trains on, the slice it scores on: the last SLICE_SHARE of them, at least
    SLICE_MIN and at most SLICE_MAX, groups kept whole where examples name them — a slice that shares groups
    with what the probe trains on favours the lr that fits those groups best, not the one that generalises
    to new ones), or None where there are too few to spare a slice (fewer than 4 × SLICE_MIN, or groups so
    large that the slice would outnumber the rest). Both in the examples' order."""
    if len(examples) < 4 * SLICE_MIN:
        return None
    count = min(SLICE_MAX, max(SLICE_MIN, round(SLICE_SHARE * len(examples))))
    rest, part = split_off(examples, count, list(reversed(range(len(examples)))))
    if len(rest) < len(part):  # groups too large to spare one: as too few examples
        return None
    return [examples[i] for i in sorted(rest)], [examples[i] for i in sorted(part)]


def probe_lr(
    sigma_model, tokenizer, task: Task, settings: TrainSettings, device, packed: bool
) -> Probe | None:
    """lr auto for the job (see the module docstring): settings.lr is the rule's centre. Each probed lr trains
    a fresh adapter of the model's config ("lr_probe_<i>") together with the others, is scored on the slice and
    deleted; the model's own adapter is left untouched and active. None where the task is too small to probe
    (the centre stays)."""
    parts = probe_split(task.train)
    if parts is None:
        log(
            f"lr auto: {len(task.train)} training examples are too few to probe; lr {settings.lr:g} (the rule's)"
        )
        return None
    probe_task = dataclasses.replace(task, train=parts[0], heldout=parts[1])
    steps = probe_steps(settings.steps)
    probing = dataclasses.replace(settings, steps=steps, heldout=len(parts[1]), eval_accuracy=0, save_every=0)
    own, config = sigma_model.active_adapter, sigma_model.peft_config[sigma_model.active_adapter]

    def trial(lrs: list[float]) -> dict[float, float | None]:
        members = [
            Member(f"lr_probe_{i}", probe_task, dataclasses.replace(probing, lr=lr))
            for i, lr in enumerate(lrs)
        ]
        for member in members:
            sigma_model.add_adapter(member.name, config)
        try:
            outcome = fit_together(sigma_model, tokenizer, members, device, packed=packed)
            losses = {}
            for member in members:
                if member.name in outcome.failed:
                    losses[member.settings.lr] = None
                    continue
                sigma_model.set_adapter(member.name)
                losses[member.settings.lr] = score(
                    sigma_model, tokenizer, probe_task, probing, device, packed
                ).loss
        finally:
            sigma_model.set_adapter(own)
            for member in members:
                sigma_model.delete_adapter(member.name)
        log("lr auto, probe of " + ", ".join(f"{lr:g}: {_shown(loss)}" for lr, loss in losses.items()))
        return losses

    log(
        f"lr auto: probing lrs around {settings.lr:g} for {steps} steps each on {len(parts[0])} training "
        f"examples, scored on {len(parts[1])} others"
    )
    probe = choose_lr(settings.lr, trial)
    log(f"lr auto: {probe.lr:g} (the smallest lr within {PROBE_TOLERANCE:.0%} of the lowest probe loss)")
    return probe


def _shown(loss: float | None) -> str:
    return "diverged" if loss is None else f"{loss:.4f}"
