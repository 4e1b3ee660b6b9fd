"""SlotCache: a static KV cache of `slots` rows × `length` positions per layer, and the attention that
writes and reads it (registered with transformers as the attention implementation "sigmatune_slots").

Each request owns a slot. A forward over the cache is described by a SlotStep: batch row b writes the
keys and values of its query tokens at (write_rows[b, t], positions[b, t]) and attends to the keys its
`visible` mask shows. A decode step keeps batch row b in slot b (the engine compacts its slots), so it
reads the cache as a view — static shapes and no copies, what a CUDA graph needs; a prefill step names
the slots it reads (read_rows). One extra slot, `scratch`, takes the writes of padding tokens.

Invariant: a position is written (by a prefill or a decode step) before any query can see it, so what
padding writes at positions past a request's end never counts.

Grouped-query attention without copies: the g = heads / kv_heads query heads that share a key head are
folded into the query length, q (B, H, T, D) → (B, KVH, g·T, D), and the mask repeated g times. A decode
step on CUDA (lengths given) takes ops/decode_attention.py's kernel instead, which reads each row's own length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from .ops import decode_attention

ATTENTION = "sigmatune_slots"


@dataclass
class SlotStep:
    write_rows: torch.Tensor  # (B, T) long: the slot each query token's key and value go to
    positions: torch.Tensor  # (B, T) long: their positions
    visible: torch.Tensor  # (B, 1, T, L) bool: key position j is visible to query token t
    read_rows: torch.Tensor | None = None  # (B,) long: the slot batch row b reads; None: slot b
    lengths: torch.Tensor | None = None  # (B,) long, a decode step's: positions row b sees (its position + 1)


class SlotCache:
    """Keys and values (layers, slots + 1, length, kv_heads, head_dim) in the model's dtype."""

    def __init__(self, config, slots: int, length: int, device, dtype: torch.dtype):
        check_supported(config, length)
        layers, kv_heads, head_dim = kv_shape(config)
        shape = (layers, slots + 1, length, kv_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.slots, self.length, self.scratch = slots, length, slots

    @staticmethod
    def bytes_per_slot(config, length: int, dtype: torch.dtype) -> int:
        layers, kv_heads, head_dim = kv_shape(config)
        return 2 * layers * length * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def move(self, source: int, target: int) -> None:
        """Slot target takes slot source's keys and values (every layer, every position)."""
        if source != target:
            self.keys[:, target].copy_(self.keys[:, source])
            self.values[:, target].copy_(self.values[:, source])

    def attend(self, layer: int, query, key, value, step: SlotStep, scaling: float | None) -> torch.Tensor:
        """Write this step's keys and values, then attend: query (B, H, T, D), key/value (B, KVH, T, D)
        → (B, T, H, D)."""
        keys, values = self.keys[layer], self.values[layer]  # (slots + 1, length, KVH, D)
        keys.index_put_((step.write_rows, step.positions), key.transpose(1, 2))
        values.index_put_((step.write_rows, step.positions), value.transpose(1, 2))
        batch, heads, tokens, dim = query.shape
        if step.lengths is not None and step.read_rows is None and decode_attention.available(query):
            scale = dim**-0.5 if scaling is None else scaling
            out = decode_attention.decode_attention(query[:, :, 0], keys, values, step.lengths, scale)
            return out.view(batch, 1, heads, dim)  # (B, T = 1, H, D)
        width = step.visible.shape[-1]
        if step.read_rows is None:
            keys, values = keys[:batch, :width], values[:batch, :width]
        else:
            keys, values = keys[step.read_rows, :width], values[step.read_rows, :width]
        kv_heads = keys.shape[2]
        group = heads // kv_heads
        folded = query.reshape(batch, kv_heads, group * tokens, dim)  # heads h = k·g + i → row i·T + t
        mask = step.visible.repeat(1, 1, group, 1)  # (B, 1, g·T, L)
        out = torch.nn.functional.scaled_dot_product_attention(
            folded, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scaling
        )  # (B, KVH, g·T, D)
        return out.reshape(batch, heads, tokens, dim).transpose(1, 2)


def text_config(config):
    """The part of a transformers config that describes the language model (itself for most models)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported(config, length: int) -> None:
    """Refuse what slot attention does not compute: a sliding window shorter than the slots, logit
    soft-capping."""
    text = text_config(config)
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    if window is not None and window < length:
        raise ValueError(
            f"the model attends over a sliding window of {window} positions and the engine's slots hold "
            f"{length}: start the engine with max_len ≤ {window}"
        )
    if getattr(text, "attn_logit_softcapping", None):
        raise ValueError("the engine's attention does not soft-cap attention logits (Gemma 2): not served")


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers config (its text part)."""
    text = text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface over a SlotCache: the forward passes slot_cache and slot_step."""
    cache, step = kwargs["slot_cache"], kwargs["slot_step"]
    return cache.attend(module.layer_idx, query, key, value, step, scaling), None


AttentionInterface.register(ATTENTION, slot_attention)
