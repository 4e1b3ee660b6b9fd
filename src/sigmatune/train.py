"""The main job: fine-tune a model's singular values on a task, scoring it before and after.

A plain loop (AdamW, linear warm-up then cosine decay, gradient clipping at 1.0) over batches drawn
in a seeded order, so CPU and GPU see the same data in the same order. The adapter and a
training_summary.json (settings, scores before and after, timings) are written atomically.

Nothing is lost on failure: every save_every steps a checkpoint (checkpoint.py) goes into the output
folder, and `resume` continues it to the same result as a run that never stopped. A NaN or Inf in the
loss, the gradients or the vectors stops the run before it touches a file: the adapter already in the
output folder and the last checkpoint stay as they were.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .checkpoint import CHECKPOINT_NAME
from .config import SigmaConfig
from .data import DEFAULT_DATA, DEFAULT_MODEL, Task, load_model, load_task
from .evaluate import Score, exact_match, heldout_loss, token_loss
from .files import atomic_write_json
from .model import SigmaModel, get_sigma_model
from .tokens import collate, encode

SUMMARY_NAME = "training_summary.json"


@dataclass
class TrainSettings:
    model: str = DEFAULT_MODEL  # "smollm2" (the default model) or any from_pretrained path / hub name
    data: str = DEFAULT_DATA  # "bigbench:<task>" or a .jsonl/.json/.csv/.txt file
    rank: int | str = "full"  # singular values per layer, or "full" (all: the best quality measured)
    targets: str = "all-linear"  # "all-linear", comma-separated names, or a regex
    update: str = "multiplicative"  # "multiplicative" or "additive"
    lr: float = 1e-2  # peak learning rate (vector methods want ~10x LoRA's; the best in both quality sweeps)
    steps: int = 150  # optimizer steps
    batch_size: int = 8  # examples per step
    max_length: int = 128  # tokens per example (prompt + answer)
    heldout: int = 200  # held-out examples (loss); a seeded shuffle picks them
    eval_accuracy: int = 100  # held-out examples scored by exact match (0 = skip)
    warmup: float = 0.05  # share of steps with a linear warm-up
    device: str = "auto"  # "auto" (cuda when there is one), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16"
    output_dir: str = "sigmatune-adapter"  # where the adapter and training_summary.json go
    seed: int = 0  # data order, held-out split and any random init
    save_every: int = 50  # write a checkpoint every this many steps (0 = never) into the output folder
    resume: bool = False  # continue the interrupted run whose checkpoint is in the output folder

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length", "heldout", "eval_accuracy", "save_every"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name in ("eval_accuracy", "save_every") else 1)
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.lr < 10:
            raise ValueError(f"lr must be a positive learning rate below 10, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the steps in [0, 1), got {self.warmup!r}")

    def sigma_config(self) -> SigmaConfig:
        targets = self.targets  # "all-linear", a regex, or names: "q_proj" / "q_proj,v_proj"
        if targets != "all-linear" and ("," in targets or targets.isidentifier()):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return SigmaConfig(rank=self.rank, target_modules=targets, update=self.update)


def train(settings: TrainSettings) -> dict:
    """Run the job end to end; returns (and saves) the summary with scores before and after."""
    started = time.perf_counter()
    config = settings.sigma_config()  # bad settings fail here, before any download
    resumed = _checkpoint_to_resume(settings)
    torch.manual_seed(settings.seed)
    device, dtype = resolve_device(settings.device, settings.dtype)
    model, tokenizer = load_model(settings.model, dtype, device)
    settings = fit_to_model(model, settings, device)
    if resumed is not None:
        _check_same_run(resumed, settings)
    task = load_task(settings.data, settings.heldout, settings.seed)
    _log(
        f"task {task.name}: {len(task.train)} train / {len(task.heldout)} held-out examples from {task.source}"
    )
    sigma_model = get_sigma_model(model, config)
    sigma_model.print_trainable_parameters()
    if resumed is None:
        before = score(sigma_model, tokenizer, task, settings, device)
    else:
        before = Score(**resumed.before)
        _log(
            f"resuming at step {resumed.step} of {settings.steps} from {settings.output_dir}/{CHECKPOINT_NAME}"
        )
    _log(f"before: {format_score(before)}")
    train_start = time.perf_counter()
    checkpoints = Path(settings.output_dir) / CHECKPOINT_NAME
    history = fit(sigma_model, tokenizer, task, settings, device, checkpoints, before, resumed)
    train_seconds = time.perf_counter() - train_start
    after = score(sigma_model, tokenizer, task, settings, device)
    sigma_model.save_pretrained(settings.output_dir)
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
        "total_seconds": round(time.perf_counter() - started, 1),
        "resumed_from_step": resumed.step if resumed else None,
        "loss_history": history,
    }
    atomic_write_json(Path(settings.output_dir) / SUMMARY_NAME, summary)
    checkpoints.unlink(missing_ok=True)  # the adapter is saved: done
    _print_summary(summary)
    return summary


TRAJECTORY = ("model", "data", "rank", "targets", "update", "lr", "steps", "batch_size", "max_length")
TRAJECTORY += ("heldout", "warmup", "dtype", "seed")  # settings a resumed run must share to end the same


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
    differ = [
        f"{name} {resumed.settings.get(name)!r} → {getattr(settings, name)!r}"
        for name in TRAJECTORY
        if resumed.settings.get(name) != getattr(settings, name)
    ]
    if differ:
        raise ValueError(
            f"--resume: the checkpoint in {settings.output_dir} was written by a run with other settings "
            f"({'; '.join(differ)}); resume with the same settings"
        )


def fit(
    model: SigmaModel,
    tokenizer,
    task: Task,
    settings: TrainSettings,
    device,
    path: Path | None = None,
    before: Score | None = None,
    resumed: checkpoint.Checkpoint | None = None,
) -> list[float]:
    """The optimisation loop; returns the training loss of every step (those before a resume included).
    With a checkpoint path, a checkpoint goes there every settings.save_every steps (with `before`, the
    score before training, to report on resume); `resumed` continues one."""
    encoded = [encode(tokenizer, task.instruction, e, settings.max_length) for e in task.train]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    done, history = 0, []
    if resumed is not None:
        checkpoint.restore(path, resumed, model, optimizer)
        done, history = resumed.step, list(resumed.history)
    order = batch_order(len(encoded), settings.batch_size, settings.steps, settings.seed)
    smoothed, tokens, start = None, 0, time.perf_counter()
    model.train()
    bar = tqdm(order[done:], desc="train", unit="step", disable=None, dynamic_ncols=True, initial=done)
    bar.total = settings.steps
    every = max(1, settings.steps // 10)  # without a terminal (no bar), a log line per 10% of the steps
    for step, indices in enumerate(bar, done + 1):
        batch = {
            k: v.to(device) for k, v in collate([encoded[i] for i in indices], tokenizer.pad_token_id).items()
        }
        loss = _backward(model, batch, step, path)
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
            state = checkpoint.Checkpoint(step, history, dataclasses.asdict(settings), _asdict(before), {})
            checkpoint.save(path, model, optimizer, state)
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        tokens += int(batch["attention_mask"].sum())
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        if bar.disable and (step % every == 0 or step == settings.steps):
            eta = elapsed / (step - done) * (settings.steps - step)
            _log(
                f"step {step}/{settings.steps}  loss {smoothed:.3f}  {tokens / elapsed:.0f} tok/s  eta {eta:.0f} s"
            )
    bar.close()
    model.eval()
    return history


def _asdict(score_before: Score | None) -> dict:
    return dataclasses.asdict(score_before) if score_before is not None else {}


def _check_finite(value: torch.Tensor, what: str, step: int, path: Path | None) -> None:
    if not torch.isfinite(value):
        raise FloatingPointError(
            f"the {what} became {float(value)} at step {step}; lower --lr. " + _kept(path)
        )


def _kept(path: Path | None) -> str:
    """What is safe on disk after a failed step."""
    if path is not None and path.exists():
        return f"Nothing was saved; the last good checkpoint is {path}: continue it with --resume."
    return "Nothing was saved; the adapter in the output folder, if any, is untouched."


def _backward(model, batch: dict, step: int, path: Path | None) -> torch.Tensor:
    """Loss and gradients of one batch; a non-finite loss or running out of memory is a clear error."""
    try:
        loss, _ = token_loss(model, batch)
        _check_finite(loss.detach(), "training loss", step, path)
        loss.backward()
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError) and "memory" not in str(err):
            raise
        raise MemoryError(
            f"out of memory at step {step} ({str(err).splitlines()[0][:120]}); "
            "lower --batch-size or --max-length. " + _kept(path)
        ) from None
    return loss


def fit_to_model(model, settings: TrainSettings, device: torch.device) -> TrainSettings:
    """Settings that fit: max_length capped at the model's context; activations (a rough upper
    estimate: per token, 48 bytes per hidden unit per layer plus the logits) beyond free memory refused."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None)
    if context and settings.max_length > context:
        _log(f"--max-length {settings.max_length} capped at the model's context of {context} tokens")
        settings = dataclasses.replace(settings, max_length=context)
    tokens = settings.batch_size * settings.max_length
    per_token = 48 * config.hidden_size * config.num_hidden_layers + 8 * config.vocab_size
    need, free = tokens * per_token, _free_memory(device)
    if free and need > free:
        raise ValueError(
            f"--batch-size {settings.batch_size} × --max-length {settings.max_length} may need ~{need / 2**30:.1f} "
            f"GiB for activations, more than the {free / 2**30:.1f} GiB free on {device}; lower one of them"
        )
    return settings


def _free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = next((line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
    return int(found) * 1024 if found else None


def score(model, tokenizer, task: Task, settings: TrainSettings, device) -> Score:
    """Held-out loss (all held-out examples) and exact-match accuracy (the first eval_accuracy of them)."""
    encoded = [encode(tokenizer, task.instruction, e, settings.max_length) for e in task.heldout]
    loss = heldout_loss(model, encoded, tokenizer.pad_token_id, settings.batch_size * 2, device)
    graded = [e for e in task.heldout if e.prompt is not None][: settings.eval_accuracy]
    accuracy = None
    if graded:
        accuracy, _ = exact_match(model, tokenizer, task.instruction, graded, settings.batch_size * 4, device)
    return Score(loss=round(loss, 4), accuracy=accuracy, examples=len(task.heldout))


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """ "auto" picks CUDA when present; dtype "auto" is bfloat16 on CUDA and float32 on CPU."""
    chosen = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu")
    )
    if dtype == "auto":
        return chosen, torch.bfloat16 if chosen.type == "cuda" else torch.float32
    return chosen, getattr(torch, dtype)


def format_score(s: Score) -> str:
    accuracy = "" if s.accuracy is None else f", exact match {100 * s.accuracy:.1f}%"
    return f"held-out loss {s.loss:.4f}{accuracy}"


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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
