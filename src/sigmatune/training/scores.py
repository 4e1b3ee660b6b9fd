"""A job's scores: held-out loss and exact match after training, and the base model's before (cached)."""

from __future__ import annotations

from .data import Task
from .evaluate import Score, exact_match, heldout_loss
from .loop import log
from .score_cache import cached_score, keep_score, score_key
from .settings import TrainSettings
from .tokens import encode


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
