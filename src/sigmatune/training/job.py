"""The main job: fine-tune a model's singular values on a task, scoring it before and after.

load the model and task → wrap it (get_sigma_model) → score → fit (loop.py; lr auto: lr_auto.py, a window of
lrs trained together) → score → save the adapter and a training_summary.json (settings, scores before and after, timings), both
written atomically.

Nothing is lost on failure: every save_every steps a checkpoint goes into the output folder, and
`resume` continues it to the same result as a run that never stopped; it must be a run with the same
settings (settings.TRAJECTORY). A NaN or Inf stops the run before it touches a file: the adapter already
in the output folder and the last checkpoint stay as they were.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..formats.checkpoint import CHECKPOINT_NAME
from ..formats.files import atomic_write_json
from ..formats.model_card import write_model_card
from ..model.exchange import record_of
from ..model.sigma_model import get_sigma_model
from . import together_job
from .data import load_task
from .evaluate import Score
from .loop import fit, log, use_packing_for
from .lr_auto import fit_auto
from .output_lock import output_lock
from .scores import base_score, format_score, score
from .settings import TrainSettings
from .setup import Phases, prepared
from .summary import SUMMARY_NAME


def train(settings: TrainSettings, setup_seconds: float | None = None) -> dict:
    """Run the job end to end; returns (and saves) the summary with scores before and after. The output
    folder is locked meanwhile (output_lock.py): a second run into it is refused. setup_seconds: the time
    spent before the job (scripts/train.sh's set-up), the time table's first phase. Several learning
    rates (a sweep) or a manifest train several adapters at once (together_job.py)."""
    config = settings.sigma_config()  # bad settings fail here, before any download
    with output_lock(settings.output_dir):
        if settings.trains_several():
            return together_job.train(settings, config, Phases(setup_seconds))
        return _train(settings, config, Phases(setup_seconds))


def _train(settings: TrainSettings, config, clock: Phases) -> dict:
    settings, config, model, tokenizer, device, dtype, resumed = prepared(settings, config)
    task = load_task(settings.data, settings.heldout, settings.seed)
    log(f"task {task.name}: {task.described()}")
    clock.lap("model and data")
    sigma_model = get_sigma_model(model, config)
    sigma_model.print_trainable_parameters()
    packed = use_packing_for(sigma_model, tokenizer, task, settings, device)
    clock.lap("bases")
    if resumed is not None:
        log(
            f"resuming at step {resumed.step} of {settings.steps} from {settings.output_dir}/{CHECKPOINT_NAME}"
        )
    if resumed is None or not resumed.before:  # a checkpoint written without the score before: scored now
        before = base_score(sigma_model, tokenizer, task, settings, device, dtype, packed)
    else:
        before = Score(**resumed.before)
    log(f"before: {format_score(before)}")
    clock.lap("score before")
    checkpoints = Path(settings.output_dir) / CHECKPOINT_NAME
    choice = None
    if settings.lr == "auto":
        choice = fit_auto(
            sigma_model, tokenizer, task, settings, device, checkpoints, before, resumed, packed
        )
        history = choice.history
    else:
        history = fit(sigma_model, tokenizer, task, settings, device, checkpoints, before, resumed, packed)
    train_seconds = clock.lap("training")
    after = score(sigma_model, tokenizer, task, settings, device, packed)
    clock.lap("score after")
    sigma_model.save_pretrained(settings.output_dir)
    clock.lap("saving")
    summary = {
        "settings": dataclasses.asdict(settings),
        "task": task.record(),
        "device": str(device),
        "trainable_parameters": sigma_model.get_nb_trainable_parameters()[0],
        "before": dataclasses.asdict(before),
        "after": dataclasses.asdict(after),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(clock.total(), 1),
        "seconds": clock.seconds,
        "resumed_from_step": resumed.step if resumed else None,
        "chosen_lr": settings.lr if choice is None else choice.lr,
        "lr_auto": None if choice is None else choice.record(),
        "loss_history": history,
    }
    atomic_write_json(Path(settings.output_dir) / SUMMARY_NAME, summary)
    write_model_card(
        settings.output_dir, record_of(sigma_model, "default", False), summary
    )  # now with the scores
    checkpoints.unlink(missing_ok=True)  # the adapter is saved: done
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    before, after = summary["before"], summary["after"]
    rows = [("held-out loss", f"{before['loss']:.4f}", f"{after['loss']:.4f}")]
    if before["accuracy"] is not None:
        rows.append(("exact match", f"{100 * before['accuracy']:.1f}%", f"{100 * after['accuracy']:.1f}%"))
    print(f"\n{'':<16}{'before':>10}{'after':>10}")
    for name, b, a in rows:
        print(f"{name:<16}{b:>10}{a:>10}")
    print(
        f"trained {summary['trainable_parameters']:,} numbers in {summary['train_seconds']:.0f} s on "
        f"{summary['device']} ({summary['total_seconds']:.0f} s in all); adapter in {summary['settings']['output_dir']}"
    )
    print("where the time went: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()))
