"""The optimisation loop for several adapters at once (model/together.py): each step one batch holding every
adapter's own batch, each row through its own adapter.

Adapter k ("member") brings its task and settings (learning rate, steps, batch size, seed, warm-up); its
rows of step s are exactly the batch the one-adapter loop (loop.py) gives it at step s, its loss the mean
cross-entropy over its own labelled tokens, and the loss that is differentiated the sum of the members'
losses — so each member gets the gradient of its own loss, is clipped by its own gradient norm and steps
with its own learning rate (rows_adamw.py): it trains as it would alone. A member that ends its steps
leaves the batch.

A member that fails — a loss, gradient norm or value that is not finite (too high an lr, a batch with no
answer token to learn from) — stops with a message naming it and the step; the others train on, and only
it is not saved. Checkpoints (formats/checkpoint.py) hold every member's rows and optimizer state, and each
member's history and failure, so a resumed run goes on to the same numbers.

K members' batches take about K times one run's activation memory. Where a step's forward and backward run
out of it, the step runs again in passes of half as many members each, their gradients accumulated (each
member's rows lie in one pass, so the numbers are the same; only the time grows), down to one member a pass;
the run keeps the smaller passes to its end.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..core.progress import Progress
from ..formats import checkpoint
from ..model.together import Together
from .data import Task
from .evaluate import row_losses
from .loop import batch_order, kept_on_disk, log, lr_factor, out_of_memory
from .packing import fits, packed_row_losses
from .rows_adamw import RowsAdamW, clip_rows
from .settings import TrainSettings
from .tokens import Encoded, collate, encode


@dataclass
class Member:
    """One adapter of a run that trains several: its name in the model, its task, its settings (lr set)."""

    name: str
    task: Task
    settings: TrainSettings


def lr_name(lr: float) -> str:
    """A learning-rate candidate's adapter name: 3e-3 → "lr_0p003"."""
    return f"lr_{lr:g}".replace(".", "p")


@dataclass
class Outcome:
    histories: dict[str, list[float]]  # member → training loss of each of its steps
    failed: dict[str, str] = field(default_factory=dict)  # member → why it stopped


def fit_together(
    model,
    tokenizer,
    members: list[Member],
    device,
    path: Path | None = None,
    resumed=None,
    recorded=None,
    packed: bool = False,
) -> Outcome:
    """Train the members' adapters of `model` together; with a checkpoint path, a checkpoint every
    save_every steps (the first member's setting), holding `recorded` (the job's settings) beside the
    members'; `resumed` (checkpoint.load's) continues one. `packed`: each member's batch packed into a
    row of its own (packing.packed_row_losses; loop.use_packing says whether the model computes it
    exactly), else the members' examples padded, a row each."""
    names = [m.name for m in members]
    orders = [
        batch_order(len(m.task.train), m.settings.batch_size, m.settings.steps, m.settings.seed)
        for m in members
    ]
    encoded = _encoded(tokenizer, members, orders)
    outcome = Outcome({name: [] for name in names})
    steps, done = max(m.settings.steps for m in members), 0
    # members whose rows go through the model in one pass (halved where memory runs out)
    per_pass = len(members)
    with Together(model, names) as together:
        banks = list(together.banks().values())
        optimizer = RowsAdamW(banks, torch.zeros(len(members)))
        if resumed is not None:
            checkpoint.restore(path, resumed, model, optimizer)
            done, outcome = resumed.step, _outcome_of(resumed, names)
        model.train()
        bar = Progress(steps, "train", "steps", initial=done)
        for step in range(done + 1, steps + 1):
            active = [
                k for k, m in enumerate(members) if m.name not in outcome.failed and step <= m.settings.steps
            ]
            backward = partial(
                _backward, model, tokenizer, members, orders, encoded, active, step, device, together, packed
            )
            losses, per_pass = _within_memory(backward, per_pass, len(active), step, optimizer, device, path)
            for k in active:
                if not math.isfinite(losses[k]):
                    _fail(
                        outcome, members[k], f"the training loss became {losses[k]} at step {step}", banks, k
                    )
            norms = clip_rows(banks, 1.0)
            for k in active:
                if members[k].name not in outcome.failed and not math.isfinite(float(norms[k])):
                    _fail(
                        outcome,
                        members[k],
                        f"the gradient norm became {float(norms[k])} at step {step}",
                        banks,
                        k,
                    )
            optimizer.scales = _learning_rates(members, active, outcome, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            finite = _finite_rows(banks)  # (K,): one check of every bank, not one per member and bank
            for k in active:
                if members[k].name in outcome.failed:
                    continue
                if not finite[k]:
                    _fail(outcome, members[k], f"a trained value became NaN or Inf at step {step}", banks, k)
                else:
                    outcome.histories[members[k].name].append(round(losses[k], 4))
            if (
                path
                and members[0].settings.save_every
                and step % members[0].settings.save_every == 0
                and step < steps
            ):
                checkpoint.save(path, model, optimizer, _state(step, members, outcome, recorded))
            if len(outcome.failed) == len(members):
                break  # nothing left to train
            shown = {m.name: outcome.histories[m.name][-1] for m in members if outcome.histories[m.name]}
            bar.set_postfix(**{n: f"{v:.3f}" for n, v in list(shown.items())[:6]})  # each adapter's loss
            bar.update()
        bar.close()
        model.eval()
    return outcome


def _within_memory(backward, per_pass: int, active: int, step: int, optimizer, device, path) -> tuple:
    """(backward(per_pass): the members' losses, per_pass) — where the device runs out of memory, the step again
    in passes of half as many members (said; the failed step's partial gradients cleared first), down to one a
    pass, which running out is an error naming the fix."""
    while True:
        try:
            return backward(per_pass), per_pass
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            now = min(per_pass, active)
            if now <= 1:
                raise MemoryError(
                    f"out of memory at step {step} with one adapter's batch a pass "
                    f"({str(err).splitlines()[0][:120]}); lower --batch-size or --max-length. "
                    + kept_on_disk(path)
                ) from None
            per_pass = (now + 1) // 2
            log(
                f"out of memory at step {step} with {now} adapters' batches a pass: now {per_pass} a pass "
                "(the same numbers, more time)"
            )
        optimizer.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def _backward(
    model, tokenizer, members, orders, encoded, active, step, device, together, packed, per_pass
) -> list[float]:
    """Each active member's loss on its batch of this step (NaN for a member whose batch holds no answer
    token), the gradients of their sum in the banks, in passes of per_pass members; the members' losses by
    index (NaN if inactive)."""
    batches = {k: [encoded[k][i] for i in orders[k][step - 1]] for k in active}
    losses = [math.nan] * len(members)
    packed = packed and all(fits(batch) for batch in batches.values())  # one decision for the whole step
    keys = list(batches)
    for start in range(0, len(keys), per_pass):
        chunk = {k: batches[k] for k in keys[start : start + per_pass]}
        for k, loss in _pass(model, tokenizer, chunk, len(members), device, together, packed).items():
            losses[k] = loss
    return losses


def _pass(model, tokenizer, batches: dict, members: int, device, together, packed) -> dict[int, float]:
    """One pass of some members' batches (member index → its examples) through the model: each one's mean
    loss over its answer tokens, and the gradient of their sum added to the banks'."""
    if packed:
        row_ids = torch.tensor(list(batches), device=device)  # one packed row per member
        together.rows(row_ids)
        sums, counts = packed_row_losses(model, list(batches.values()), tokenizer.pad_token_id, device)
    else:
        row_ids = torch.tensor([k for k, batch in batches.items() for _ in batch], device=device)
        together.rows(row_ids)
        examples = [e for batch in batches.values() for e in batch]
        batch = {key: value.to(device) for key, value in collate(examples, tokenizer.pad_token_id).items()}
        sums, counts = row_losses(model, batch)
    per_member = torch.zeros(members, device=device).index_add(0, row_ids, sums.float())
    counted = torch.zeros(members, device=device).index_add(0, row_ids, counts.float())
    mean = per_member / counted  # 0/0 = NaN: a member's batch with no answer token (or not in this pass)
    values = mean.tolist()
    finite = torch.isfinite(mean)
    if finite.any():
        mean[finite].sum().backward()
    return {k: values[k] for k in batches}


def _finite_rows(banks) -> list[bool]:
    """Whether each row (adapter) holds finite values in every bank."""
    return (
        torch.stack([torch.isfinite(bank.detach()).flatten(1).all(dim=1) for bank in banks])
        .all(dim=0)
        .tolist()
    )


def _learning_rates(members, active, outcome, step) -> torch.Tensor:
    """Each member's learning rate at this step (warm-up and cosine decay over its own steps); 0 for a
    member that is done or failed."""
    rates = [0.0] * len(members)
    for k in active:
        s = members[k].settings
        if members[k].name not in outcome.failed:
            rates[k] = s.lr * lr_factor(step - 1, s.steps, s.warmup)
    return torch.tensor(rates, dtype=torch.float64)


def _fail(outcome: Outcome, member: Member, what: str, banks, k: int) -> None:
    """Stop a member: say why; its rows are zeroed (it is not saved) and take no further gradient."""
    outcome.failed[member.name] = (
        f"adapter {member.name!r}: {what}; it was stopped (not saved) and the others trained on: "
        "lower its lr, or check its data"
    )
    with torch.no_grad():
        for bank in banks:
            bank[k].zero_()
            if bank.grad is not None:
                bank.grad[k].zero_()


def _encoded(tokenizer, members: list[Member], orders) -> list[dict[int, Encoded]]:
    """Per member, its examples that the steps use, encoded (once for members sharing a task)."""
    done: dict[tuple[int, int, int], Encoded] = {}
    out = []
    for member, order in zip(members, orders, strict=True):
        s, task = member.settings, member.task
        mine = {}
        for i in sorted({i for batch in order for i in batch}):
            key = (id(task), s.max_length, i)
            if key not in done:
                done[key] = encode(tokenizer, task.instruction, task.train[i], s.max_length)
            mine[i] = done[key]
        out.append(mine)
    return out


def _state(step: int, members: list[Member], outcome: Outcome, recorded) -> checkpoint.Checkpoint:
    """The run state a checkpoint keeps: the job's settings, and every member's settings, history and
    failure."""
    settings = {
        "steps": max(m.settings.steps for m in members),
        **(recorded or {}),  # the job's steps, when given: at least every member's
        "adapters": {
            m.name: {
                "settings": dataclasses.asdict(m.settings),
                "history": outcome.histories[m.name],
                "failed": outcome.failed.get(m.name),
            }
            for m in members
        },
    }
    history = [0.0] * step  # the per-member histories are in settings.adapters
    return checkpoint.Checkpoint(step, history, settings, {}, {})


def _outcome_of(resumed, names: list[str]) -> Outcome:
    adapters = resumed.settings.get("adapters", {})
    if set(adapters) != set(names):
        raise ValueError(f"the checkpoint trained the adapters {sorted(adapters)}, not {sorted(names)}")
    outcome = Outcome({n: list(adapters[n]["history"]) for n in names})
    outcome.failed = {n: adapters[n]["failed"] for n in names if adapters[n].get("failed")}
    return outcome
