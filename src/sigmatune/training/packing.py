"""Packed batches: a batch's examples in one row, the prompt prefix they share computed once.

The examples of a task begin alike (the chat template's system turn and the user header: 23 of the ~42
tokens of a SmolLM2 qa_wikidata example), and padding a batch to its longest example adds more. A packed
batch is one row

    [ prefix | rest_1 | rest_2 | … | rest_B ]       prefix: the tokens every example starts with

with a block mask (rest_i sees the prefix and itself, causally) and each token at the position it has in
its own example, so every logit is the one the padded batch gives it. The loss is the padded batch's too:
the mean cross-entropy over every labelled token (label t of example i is predicted by its token t − 1,
in the prefix or in rest_i), computed from those positions alone (logits_to_keep). Examples only share a
prefix up to their first labelled token, so no label sits inside it.

Batches longer than MAX_TOKENS in all stay padded (fits). Any decoder that takes position_ids and a 4-D additive mask (transformers' masking utilities pass one
through as it is) computes this exactly; evaluate.packs_exactly() checks a model once against the padded
batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .tokens import IGNORE, Encoded


@dataclass
class Packed:
    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T): each token's position in its own example
    segments: torch.Tensor  # (T,): −1 for the shared prefix, i for example i's rest
    predictors: torch.Tensor  # (K,): the positions whose logits predict the labels
    targets: torch.Tensor  # (K,): the labels

    def to(self, device) -> Packed:
        return Packed(*(t.to(device) for t in (self.input_ids, self.position_ids, self.segments)),
                      self.predictors.to(device), self.targets.to(device))  # fmt: skip

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


MAX_TOKENS = 4096  # a longer row is not packed: its mask (T × T) and attention grow with T², not B · L²


def fits(batch: list[Encoded]) -> bool:
    """Whether a batch is short enough to pack (at most MAX_TOKENS in all, before sharing a prefix): the
    default job's batches are ~330 tokens; a batch of 64 × 1,024 would attend over 65k positions."""
    return sum(len(e.input_ids) for e in batch) <= MAX_TOKENS


def pack(batch: list[Encoded]) -> Packed:
    """One packed row for a batch of encoded examples."""
    shared = _shared_prefix(batch)
    ids, positions, segments = list(batch[0].input_ids[:shared]), list(range(shared)), [-1] * shared
    predictors, targets = [], []
    for i, example in enumerate(batch):
        start = len(ids)  # where token `shared` of this example sits in the row
        rest = len(example.input_ids) - shared
        ids += example.input_ids[shared:]
        positions += range(shared, shared + rest)
        segments += [i] * rest
        for t in range(max(1, shared), len(example.input_ids)):
            if example.labels[t] != IGNORE:
                before = t - 1  # the token that predicts label t: in the prefix, or in this example's rest
                predictors.append(before if before < shared else start + before - shared)
                targets.append(example.labels[t])
    return Packed(
        torch.tensor([ids]), torch.tensor([positions]), torch.tensor(segments),
        torch.tensor(predictors, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
    )  # fmt: skip


def _shared_prefix(batch: list[Encoded]) -> int:
    """The length of the tokens every example starts with, up to the first labelled token of any."""
    first = min(_first_label(e) for e in batch)
    shortest = min(len(e.input_ids) for e in batch)
    limit, reference = min(first, shortest), batch[0].input_ids
    shared = 0
    while shared < limit and all(e.input_ids[shared] == reference[shared] for e in batch):
        shared += 1
    return shared


def _first_label(example: Encoded) -> int:
    return next((t for t, label in enumerate(example.labels) if label != IGNORE), len(example.labels))


def block_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, T, T) additive mask: query q sees key k ≤ q of the shared prefix or of its own example."""
    n = segments.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    visible = causal & ((segments[None, :] == -1) | (segments[None, :] == segments[:, None]))
    mask = torch.zeros(n, n, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[None, None]


def packed_loss(model: nn.Module, packed: Packed) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the labelled tokens, their count) of a packed batch."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    logits = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=block_mask(packed.segments, dtype),
        logits_to_keep=packed.predictors,
        use_cache=False,
    ).logits  # (1, K, V)
    loss = nn.functional.cross_entropy(logits[0].float(), packed.targets)
    return loss, int(packed.targets.numel())


def packed_row_losses(
    model: nn.Module, batches: list[list[Encoded]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over each batch's labelled tokens (R,), their count (R,)) with every batch
    packed into a row of its own (pack()), the rows right-padded to the longest: R batches of adapters
    trained together (together_loop.py) in one forward, each row's loss the one packed_loss gives it alone.
    A padding token sees the prefix and the padding before it (no query sees nothing); the logits are
    computed at the positions any row predicts from."""
    packs = [pack(batch) for batch in batches]
    width = max(p.tokens for p in packs)
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    segments = torch.full((len(packs), width), -2, dtype=torch.long)  # -2: padding
    for row, p in enumerate(packs):
        ids[row, : p.tokens], positions[row, : p.tokens] = p.input_ids[0], p.position_ids[0]
        segments[row, : p.tokens] = p.segments
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    masks = torch.cat([block_mask(s, dtype) for s in segments.to(device)])  # (R, 1, T, T)
    keep = torch.unique(torch.cat([p.predictors for p in packs]))  # sorted positions any row predicts from
    logits = model(
        input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=masks,
        logits_to_keep=keep.to(device), use_cache=False,
    ).logits  # (R, len(keep), V)  # fmt: skip
    sums = []
    for row, p in enumerate(packs):
        at = torch.searchsorted(keep, p.predictors).to(device)  # where its predictors sit among `keep`
        losses = nn.functional.cross_entropy(logits[row, at].float(), p.targets.to(device), reduction="sum")
        sums.append(losses)
    counts = torch.tensor([p.targets.numel() for p in packs], device=device)
    return torch.stack(sums), counts


def can_pack(model: nn.Module) -> bool:
    """Whether the model's attention takes a custom mask as it is (eager or SDPA, no sliding window: a
    window would have to be in the mask)."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    return attention in ("eager", "sdpa") and not getattr(config, "sliding_window", None)
