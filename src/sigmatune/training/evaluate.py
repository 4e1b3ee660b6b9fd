"""Scoring a model on held-out examples: loss on the answer tokens, and exact-match accuracy.

loss      mean cross-entropy per taught token (the answer and the end of the turn)
accuracy  share of prompts whose greedy answer equals one of the accepted answers, compared after
          normalising case, surrounding whitespace, quotes and final punctuation
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.progress import Progress
from .data import Example
from .packing import can_pack, fits, pack, packed_loss
from .tokens import IGNORE, Encoded, collate, prompt_batch


@dataclass
class Score:
    loss: float  # mean cross-entropy per answer token
    accuracy: float | None  # exact match, None when the examples have no prompts
    examples: int


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over labelled tokens, their count)."""
    logits, kept = _predictions(model, batch)
    count = int((kept != IGNORE).sum())
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), kept.flatten(), ignore_index=IGNORE)
    return loss, count


def row_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over each row's labelled tokens (B,), their count per row (B,)): a batch whose
    rows belong to different adapters (model/together.py) is a sum of per-adapter losses."""
    logits, kept = _predictions(model, batch)
    losses = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), kept.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return losses.view(kept.shape).sum(dim=1), (kept != IGNORE).sum(dim=1)


def _predictions(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K, V), the labels they predict (B, K)). Logits are computed only from the first position
    that predicts a label on, when the model supports logits_to_keep (saves the output head)."""
    labels = batch["labels"]
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    labelled = (targets != IGNORE).any(dim=0).nonzero()
    start = int(labelled[0]) if len(labelled) else 0
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = torch.arange(start, labels.shape[1] - 1, device=labels.device)
        logits = model(**kwargs).logits  # (B, K, V)
    else:
        logits = model(**kwargs).logits[:, start:-1]
    return logits, targets[:, start:]


@torch.no_grad()
def heldout_loss(
    model: nn.Module, encoded: list[Encoded], pad_id: int, batch_size: int, device, packed: bool = False
) -> float:
    """Mean cross-entropy per labelled token over the examples, in batches (packed ones: packing.py)."""
    total, count = 0.0, 0
    model.eval()
    starts = range(0, len(encoded), batch_size)
    bar = Progress(len(starts), "held-out loss", "batches", leave=False)
    for start in starts:
        loss, n = batch_loss(model, encoded[start : start + batch_size], pad_id, device, packed)
        total, count = total + float(loss) * n, count + n
        bar.update()
    bar.close()
    return total / max(count, 1)


def batch_loss(
    model: nn.Module, batch: list[Encoded], pad_id: int, device, packed: bool
) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the labelled tokens, their count) of a batch: packed into one row when
    `packed` and it fits (packing.py), else padded."""
    if not any(label != IGNORE for e in batch for label in e.labels[1:]):  # the first is never predicted
        raise ValueError(
            f"a batch of {len(batch)} examples holds no answer token to learn from (their answers are empty "
            "or were cut by --max-length), so its loss would be 0/0: raise --max-length or drop empty examples"
        )
    if packed and fits(batch):
        return packed_loss(model, pack(batch).to(device))
    return token_loss(model, {k: v.to(device) for k, v in collate(batch, pad_id).items()})


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    instruction: str | None,
    examples: list[Example],
    batch_size: int,
    device,
    max_new_tokens=24,
) -> tuple[float, list[tuple[str, str, list[str]]]]:
    """(accuracy, [(prompt, generated answer, accepted answers)]) by greedy decoding; the progress bar
    counts decoding steps (a batch stops early once every row has ended its answer)."""
    from transformers import StoppingCriteriaList

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples, correct = [], 0
    batches = range(0, len(examples), batch_size)
    bar = Progress(len(batches) * max_new_tokens, "held-out accuracy", "decoding steps", leave=False)
    for start in batches:
        chunk = examples[start : start + batch_size]
        batch = {
            k: v.to(device)
            for k, v in prompt_batch(tokenizer, instruction, [e.prompt for e in chunk]).items()
        }
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([_Ticks(bar)]),
        )  # fmt: skip
        bar.update((start // batch_size + 1) * max_new_tokens - bar.n)  # the steps this batch did not need
        for example, row in zip(chunk, out[:, batch["input_ids"].shape[1] :], strict=True):
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            correct += any(normalize(answer) == normalize(a) for a in example.answers)
            samples.append((example.prompt, answer, example.answers))
    bar.close()
    return correct / max(len(examples), 1), samples


class _Ticks:
    """A stopping criterion that never stops generation: it ticks a progress bar once per decoding step."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or final punctuation."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip("\"'`").rstrip(".!?;:,").strip()


@torch.no_grad()
def packs_exactly(model: nn.Module, batch: list[Encoded], pad_id: int, device) -> bool:
    """Whether the packed loss of `batch` equals the padded batch's (relative 1e-4 in fp32, 2e-2 in half
    precision), in eval mode (no dropout between the two): once per model, before packing is used for it."""
    if not can_pack(model) or not fits(batch):
        return False
    padded = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
    training = model.training
    model.eval()
    try:
        packed, _ = packed_loss(model, pack(batch).to(device))
        reference, _ = token_loss(model, padded)
    except (TypeError, ValueError, RuntimeError):  # a forward without position_ids or 4-D masks
        return False
    finally:
        model.train(training)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    return bool(torch.isclose(packed, reference, rtol=tolerance, atol=tolerance))


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters
