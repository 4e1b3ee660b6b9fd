"""The main job: fine-tune a model's singular values on a task, scoring it before and after.

load the model and task → wrap it (get_sigma_model) → score → fit (loop.py) → score → save the adapter
and a training_summary.json (settings, scores before and after, timings), both written atomically.

Nothing is lost on failure: every save_every steps a checkpoint goes into the output folder, and
`resume` continues it to the same result as a run that never stopped; it must be a run with the same
settings (settings.TRAJECTORY). A NaN or Inf stops the run before it touches a file: the adapter already
in the output folder and the last checkpoint stay as they were.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..core.device import free_memory, resolve_device
from ..core.targets import find_targets, linear_shapes
from ..formats import checkpoint
from ..formats.checkpoint import CHECKPOINT_NAME
from ..formats.files import atomic_write_json
from ..formats.model_card import write_model_card
from ..hub.loading import load_model
from ..model.exchange import record_of
from ..model.sigma_model import get_sigma_model
from .data import Task, load_task
from .evaluate import Score, exact_match, heldout_loss
from .loop import fit, log, use_packing
from .output_lock import output_lock
from .score_cache import cached_score, keep_score, score_key
from .settings import TRAJECTORY, TrainSettings
from .summary import SUMMARY_NAME
from .tokens import encode


def train(settings: TrainSettings, setup_seconds: float | None = None) -> dict:
    """Run the job end to end; returns (and saves) the summary with scores before and after. The output
    folder is locked meanwhile (output_lock.py): a second run into it is refused. setup_seconds: the time
    spent before the job (scripts/train.sh's set-up), the time table's first phase."""
    config = settings.sigma_config()  # bad settings fail here, before any download
    with output_lock(settings.output_dir):
        return _train(settings, config, Phases(setup_seconds))


def _train(settings: TrainSettings, config, clock: Phases) -> dict:
    resumed = _checkpoint_to_resume(settings)
    torch.manual_seed(settings.seed)
    device, dtype = resolve_device(settings.device, settings.dtype)
    model, tokenizer = load_model(settings.model, dtype, device)
    if not settings.is_resolved():
        settings = _resolve_auto(model, settings, config, device)
        config = settings.sigma_config()
    settings = fit_to_model(model, settings, device)
    if resumed is not None:
        _check_same_run(resumed, settings)
    task = load_task(settings.data, settings.heldout, settings.seed)
    log(
        f"task {task.name}: {len(task.train)} train / {len(task.heldout)} held-out examples from {task.source}"
    )
    clock.lap("model and data")
    sigma_model = get_sigma_model(model, config)
    sigma_model.print_trainable_parameters()
    sample = [
        encode(tokenizer, task.instruction, e, settings.max_length) for e in task.train[: settings.batch_size]
    ]
    packed = use_packing(sigma_model, sample, tokenizer, settings, device)
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
    history = fit(sigma_model, tokenizer, task, settings, device, checkpoints, before, resumed, packed)
    train_seconds = clock.lap("training")
    after = score(sigma_model, tokenizer, task, settings, device, packed)
    clock.lap("score after")
    sigma_model.save_pretrained(settings.output_dir)
    clock.lap("saving")
    summary = {
        "settings": dataclasses.asdict(settings),
        "task": {
            "name": task.name,
            "source": task.source,
            "instruction": task.instruction,
            "train": len(task.train),
            "heldout": len(task.heldout),
        },
        "device": str(device),
        "trainable_parameters": sigma_model.get_nb_trainable_parameters()[0],
        "before": dataclasses.asdict(before),
        "after": dataclasses.asdict(after),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(clock.total(), 1),
        "seconds": clock.seconds,
        "resumed_from_step": resumed.step if resumed else None,
        "loss_history": history,
    }
    atomic_write_json(Path(settings.output_dir) / SUMMARY_NAME, summary)
    write_model_card(
        settings.output_dir, record_of(sigma_model, "default", False), summary
    )  # now with the scores
    checkpoints.unlink(missing_ok=True)  # the adapter is saved: done
    _print_summary(summary)
    return summary


class Phases:
    """Wall seconds per phase of the job; setup_seconds (the time before it, given by scripts/train.sh)
    counts as its first phase, "setup"."""

    def __init__(self, setup_seconds: float | None = None):
        self.seconds: dict[str, float] = {} if setup_seconds is None else {"setup": round(setup_seconds, 1)}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> float:
        """The seconds since the last lap, kept as this phase's."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.seconds[phase] = round(seconds, 1)
        return seconds

    def total(self) -> float:
        return sum(self.seconds.values())


def _checkpoint_to_resume(settings: TrainSettings) -> checkpoint.Checkpoint | None:
    """The checkpoint to continue (resume=True), after checking it belongs to a run with these settings;
    without resume, refuse to start over an interrupted run's checkpoint (it would be overwritten)."""
    path = Path(settings.output_dir) / CHECKPOINT_NAME
    if not settings.resume:
        if path.exists():
            raise ValueError(
                f"{path} holds the checkpoint of an interrupted run; continue it with --resume, or delete "
                "it (or choose another --output-dir) to start over"
            )
        return None
    if not path.exists():
        raise ValueError(f"--resume: there is no checkpoint {path} to continue; train without --resume")
    return checkpoint.load(path)


def _check_same_run(resumed: checkpoint.Checkpoint, settings: TrainSettings) -> None:
    """A resumed run must share the settings that decide its numbers (after fit_to_model's caps)."""
    defaults = TrainSettings()  # a checkpoint of an older sigmatune lacks the newer settings: their defaults
    saved = {name: resumed.settings.get(name, getattr(defaults, name)) for name in TRAJECTORY}
    differ = [
        f"{name} {saved[name]!r} → {getattr(settings, name)!r}"
        for name in TRAJECTORY
        if saved[name] != getattr(settings, name)
    ]
    if differ:
        raise ValueError(
            f"--resume: the checkpoint in {settings.output_dir} was written by a run with other settings "
            f"({'; '.join(differ)}); resume with the same settings"
        )


def _resolve_auto(model, settings: TrainSettings, config, device: torch.device) -> TrainSettings:
    """Settings with every "auto" resolved (TrainSettings.on_device), saying what was chosen."""
    shapes = linear_shapes(model)
    smallest = min(min(shapes[name]) for name in find_targets(model, config.target_modules))
    chosen = settings.on_device(device, smallest)
    structure = f"band b={chosen.band}" if chosen.structure == "band" else chosen.structure
    log(
        f"rank {chosen.rank}, {structure}, lr {chosen.lr:g} (the {'auto' if settings.rank == 'auto' else 'default'} "
        f"choice on {device.type}; a GPU takes the full spectrum, diagonal, lr 1e-2)"
    )
    return chosen


def fit_to_model(model, settings: TrainSettings, device: torch.device) -> TrainSettings:
    """Settings that fit: max_length capped at the model's context; activations (a rough upper
    estimate: per token, 48 bytes per hidden unit per layer plus the logits) beyond free memory refused."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None)
    if context and settings.max_length > context:
        log(f"--max-length {settings.max_length} capped at the model's context of {context} tokens")
        settings = dataclasses.replace(settings, max_length=context)
    tokens = settings.batch_size * settings.max_length
    per_token = 48 * config.hidden_size * config.num_hidden_layers + 8 * config.vocab_size
    need, free = tokens * per_token, free_memory(device)
    if free and need > free:
        raise ValueError(
            f"--batch-size {settings.batch_size} × --max-length {settings.max_length} may need ~{need / 2**30:.1f} "
            f"GiB for activations, more than the {free / 2**30:.1f} GiB free on {device}; lower one of them"
        )
    return settings


def score(model, tokenizer, task: Task, settings: TrainSettings, device, packed: bool = False) -> Score:
    """Held-out loss (all held-out examples) and exact-match accuracy (the first eval_accuracy of them,
    decoded in one batch of up to 128)."""
    encoded = [encode(tokenizer, task.instruction, e, settings.max_length) for e in task.heldout]
    loss = heldout_loss(model, encoded, tokenizer.pad_token_id, settings.batch_size * 2, device, packed)
    graded = [e for e in task.heldout if e.prompt is not None][: settings.eval_accuracy]
    accuracy = None
    if graded:
        accuracy, _ = exact_match(model, tokenizer, task.instruction, graded, min(len(graded), 128), device)
    return Score(loss=round(loss, 4), accuracy=accuracy, examples=len(task.heldout))


def base_score(model, tokenizer, task: Task, settings: TrainSettings, device, dtype, packed: bool) -> Score:
    """The score before training: the base model's (an adapter starts as the identity), from the cache
    folder when this model, task and split were scored before (score_cache.py), else scored with the
    adapters off (the base model alone: no transform to compute) and kept there."""
    key = score_key(settings, dtype, device)
    kept = cached_score(key)
    if kept is not None:
        log("the base model's score of an earlier run (kept in the cache folder's scores/)")
        return kept
    with model.disable_adapter():
        result = score(model, tokenizer, task, settings, device, packed)
    keep_score(key, result)
    return result


def format_score(s: Score) -> str:
    accuracy = "" if s.accuracy is None else f", exact match {100 * s.accuracy:.1f}%"
    return f"held-out loss {s.loss:.4f}{accuracy}"


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
