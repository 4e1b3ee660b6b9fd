"""The optimisation loop: AdamW over the trainable vectors, linear warm-up then cosine decay, gradient
clipping at 1.0, batches drawn in a seeded order (so CPU and GPU see the same data in the same order).

Nothing is lost on failure: with a checkpoint path, every save_every steps a checkpoint goes there
(formats/checkpoint.py), and `resumed` continues one to the same numbers as a run that never stopped
(the data order depends on the seed alone, the learning rate on the step alone). A NaN or Inf in the
loss, the gradient norm or the vectors stops the loop before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch

from ..core.progress import Progress
from ..formats import checkpoint
from ..model.sigma_model import SigmaModel
from .data import Task
from .evaluate import Score, batch_loss, packs_exactly
from .packing import fits, pack
from .settings import TrainSettings
from .tokens import Encoded, encode


def fit(
    model: SigmaModel,
    tokenizer,
    task: Task,
    settings: TrainSettings,
    device,
    path: Path | None = None,
    before: Score | None = None,
    resumed: checkpoint.Checkpoint | None = None,
    packed: bool | None = None,
    recorded: dict | None = None,
) -> list[float]:
    """The optimisation loop; returns the training loss of every step (those before a resume included).
    With a checkpoint path, a checkpoint goes there every settings.save_every steps (with `before`, the
    score before training, to report on resume); `resumed` continues one. Batches are packed (packing.py)
    when `packed`, or when it is None and use_packing says so. `recorded`: the settings a checkpoint holds, where
    they are not these (lr auto's: lr "auto" and its choice)."""
    order = batch_order(len(task.train), settings.batch_size, settings.steps, settings.seed)
    encoded = {  # only the examples the steps use
        i: encode(tokenizer, task.instruction, task.train[i], settings.max_length)
        for i in sorted({i for batch in order for i in batch})
    }
    if packed is None:
        packed = use_packing(model, [encoded[i] for i in order[0]], tokenizer, settings, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    done, history = 0, []
    if resumed is not None:
        checkpoint.restore(path, resumed, model, optimizer)
        done, history = resumed.step, list(resumed.history)
    smoothed, tokens, start = None, 0, time.perf_counter()
    model.train()
    bar = Progress(settings.steps, "train", "steps", initial=done)  # without a terminal: a line now and then
    for step, indices in enumerate(order[done:], done + 1):
        examples = [encoded[i] for i in indices]
        loss = _backward(
            partial(batch_loss, model, examples, tokenizer.pad_token_id, device, packed), step, path
        )
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        _check_finite(norm, "gradient norm", step, path)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step - 1, settings.steps, settings.warmup)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        largest = torch.cat([p.detach().reshape(-1) for p in params]).abs().max()  # NaN if any is NaN
        _check_finite(largest, "largest trained value", step, path)
        value = float(loss.detach())
        history.append(round(value, 4))
        if path and settings.save_every and step % settings.save_every == 0 and step < settings.steps:
            kept = recorded or dataclasses.asdict(settings)
            state = checkpoint.Checkpoint(step, history, kept, _asdict(before), {})
            checkpoint.save(path, model, optimizer, state)
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        tokens += sum(len(e.input_ids) for e in examples)  # the examples' tokens, packed or padded
        bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        bar.update()
    bar.close()
    model.eval()
    return history


def _asdict(score_before: Score | None) -> dict:
    return dataclasses.asdict(score_before) if score_before is not None else {}


def _check_finite(value: torch.Tensor, what: str, step: int, path: Path | None) -> None:
    if not torch.isfinite(value):
        raise FloatingPointError(
            f"the {what} became {float(value)} at step {step}; lower --lr. " + kept_on_disk(path)
        )


def kept_on_disk(path: Path | None) -> str:
    """What is safe on disk after a failed step."""
    if path is not None and path.exists():
        return f"Nothing was saved; the last good checkpoint is {path}: continue it with --resume."
    return "Nothing was saved; the adapter in the output folder, if any, is untouched."


def use_packing(model, batch: list[Encoded], tokenizer, settings: TrainSettings, device) -> bool:
    """Whether to pack batches: settings.packing, and the model computes a packed batch exactly (checked on
    `batch`); says which."""
    if not settings.packing or not fits(batch):
        return False
    if not packs_exactly(model, batch, tokenizer.pad_token_id, device):
        log("packing: off (this model does not compute a packed batch as it computes a padded one)")
        return False
    padded = len(batch) * max(len(e.input_ids) for e in batch)
    log(f"packing: on (the first batch: {pack(batch).tokens} tokens in one row, {padded} padded)")
    return True


def use_packing_for(model, tokenizer, task: Task, settings: TrainSettings, device, examples: int = 0) -> bool:
    """use_packing judged on the task's first training examples (a batch of settings.batch_size, or `examples`),
    encoded as the loop encodes them."""
    first = task.train[: examples or settings.batch_size]
    sample = [encode(tokenizer, task.instruction, e, settings.max_length) for e in first]
    return use_packing(model, sample, tokenizer, settings, device)


def _backward(loss_of_batch, step: int, path: Path | None) -> torch.Tensor:
    """Loss (loss_of_batch() → (loss, count)) and gradients of one batch; a non-finite loss or running out
    of memory is a clear error."""
    try:
        loss, _ = loss_of_batch()
        _check_finite(loss.detach(), "training loss", step, path)
        loss.backward()
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        raise MemoryError(
            f"out of memory at step {step} ({str(err).splitlines()[0][:120]}); "
            "lower --batch-size or --max-length. " + kept_on_disk(path)
        ) from None
    return loss


def out_of_memory(err: RuntimeError) -> bool:
    """Whether an error is the device running out of memory: torch.OutOfMemoryError, or one that says so (the
    CPU allocator's "can't allocate memory", another backend's "out of memory")."""
    said = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in said or "allocate memory" in said


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """The learning-rate multiplier at a step: linear warm-up over a `warmup` share of the steps, then
    cosine decay to zero."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.5 * (1 + math.cos(math.pi * progress))


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """steps batches of example indices: seeded shuffles, epoch after epoch."""
    rng, pool, batches = random.Random(seed), [], []
    while len(batches) < steps:
        if len(pool) < batch_size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            pool += epoch
        batches.append(pool[:batch_size])
        pool = pool[batch_size:]
    return batches


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
