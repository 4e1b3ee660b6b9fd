"""Examples as token ids: chat-formatted prompts, labels on the answer only, padded batches.

A prompt is rendered with the tokenizer's chat template when it has one (system = the task's
instruction, user = the prompt, then the assistant header), else as "instruction\\n\\nprompt\\n".
Training teaches the completion after it: the answer and the end of the assistant's turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token ids on what is taught


def prompt_text(tokenizer, instruction: str | None, prompt: str) -> str:
    """The text a model sees before it answers."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            _messages(instruction, prompt), add_generation_prompt=True, tokenize=False
        )
    return (f"{instruction}\n\n" if instruction else "") + f"{prompt}\n"


def completion_text(tokenizer, instruction: str | None, prompt: str, answer: str) -> str:
    """What follows the prompt text in a finished exchange: the answer and the end of the turn."""
    if getattr(tokenizer, "chat_template", None):
        head = prompt_text(tokenizer, instruction, prompt)
        messages = [*_messages(instruction, prompt), {"role": "assistant", "content": answer}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(head):
            return full[len(head) :]
    return answer + (tokenizer.eos_token or "")


def encode(tokenizer, instruction: str | None, example: Example, max_length: int) -> Encoded:
    """Token ids and labels, at most max_length long (a long prompt loses its beginning, not the answer)."""
    if example.prompt is None:
        ids = [*tokenizer(example.answers[0], add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        ids = ids[:max_length]
        return Encoded(ids, list(ids))
    head = tokenizer(prompt_text(tokenizer, instruction, example.prompt), add_special_tokens=False).input_ids
    tail = tokenizer(
        completion_text(tokenizer, instruction, example.prompt, example.answers[0]), add_special_tokens=False
    ).input_ids[: max_length // 2]
    head = head[-(max_length - len(tail)) :]
    return Encoded(head + tail, [IGNORE] * len(head) + tail)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels, each (B, T)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def example_batches(tokenizer, instruction: str | None, examples: list[Example], max_length: int) -> list:
    """One unpadded batch per example, {"input_ids": (1, T)} of its prompt and answer: inputs for which
    every token is real (e.g. to calibrate compression)."""
    return [
        {"input_ids": torch.tensor([encode(tokenizer, instruction, e, max_length).input_ids])}
        for e in examples
    ]


def prompt_batch(tokenizer, instruction: str | None, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation, (B, T)."""
    rows = [
        tokenizer(prompt_text(tokenizer, instruction, p), add_special_tokens=False).input_ids for p in prompts
    ]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _messages(instruction: str | None, prompt: str) -> list[dict]:
    system = [{"role": "system", "content": instruction}] if instruction else []
    return [*system, {"role": "user", "content": prompt}]
