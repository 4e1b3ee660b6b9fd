"""A decode step in flight (Step) and the choice of each row's next token (sample)."""

from __future__ import annotations

import torch


class Step:
    """A launched decode step: its rows (the engine's Requests), their sampled tokens (on the device until
    taken) and the bank version its adapter rows were looked up at."""

    def __init__(self, batch: list, sampled: torch.Tensor, version: int):
        self.batch, self.sampled, self.version = batch, sampled, version
        self._host, self._ready = None, None

    def copy_to_host(self) -> None:
        """Start the tokens' copy to the host now, so that taking them waits for this step only, not for
        work queued after it."""
        if self.sampled.is_cuda:
            self._host = torch.empty(self.sampled.shape, dtype=self.sampled.dtype, pin_memory=True)
            self._host.copy_(self.sampled, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def tokens(self) -> list[int]:
        if self._ready is None:
            return self.sampled.tolist()
        self._ready.synchronize()
        return self._host.tolist()


def sample(logits: torch.Tensor, requests: list, generator: torch.Generator) -> torch.Tensor:
    """Greedy for temperature 0, else top-p sampling at each row's temperature; (B,) token ids.

    A row draws token argmax_i p_i / e_i with e_i ~ Exp(1) i.i.d. over the vocabulary (P(i) = p_i: the
    exponential race, as vLLM samples), where p is its top-p-truncated softmax(logits / temperature).
    The noise of a row whose request has its own generator (a seed) comes from that generator alone,
    drawn in vocabulary order, so its tokens do not depend on the other rows of the batch; the others
    share `generator`. Each sampled row draws once per token."""
    greedy = logits.argmax(dim=-1)
    if all(r.temperature <= 0 for r in requests):
        return greedy
    temperature = torch.tensor([r.temperature for r in requests], device=logits.device)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)  # (B, V)
    top_p = torch.tensor([r.top_p for r in requests], device=logits.device)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]  # keeps at least the top token
    probs = probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))  # (B, V), vocabulary order
    noise = torch.empty_like(probs).exponential_(generator=generator)  # (B, V)
    for b, request in enumerate(requests):
        if request.generator is not None and request.temperature > 0:
            noise[b].exponential_(generator=request.generator)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)
