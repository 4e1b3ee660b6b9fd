"""Decode attention over the slot cache in one Triton launch: each batch row's one query token attends to
the first `lengths[b]` positions of its slot, every query head of a key head's group at once.

    out[b, h] = softmax(q[b, h] · K[b, :n_b]ᵀ · scale) V[b, :n_b]      n_b = lengths[b], h in group k

Program (b, k) loads the g = heads / kv_heads query heads of key head k as one (g, D) tile (padded to 16
rows for tl.dot), streams its slot's keys and values once in blocks of BLOCK_L positions — only up to
the row's own length, not a bucket's — and keeps an online softmax in fp32 (running max m, sum l):

    m' = max(m, max_j s_j),  l' = l e^(m − m') + Σ_j e^(s_j − m'),  acc' = acc e^(m − m') + Σ_j e^(s_j − m') v_j

It replaces a masked attention over the whole bucket, which a large decode batch spent much of its step in
(benchmarks/profile_serve.py). The loop's bound is read on the GPU, so a CUDA graph replays it for any
lengths.
"""

from __future__ import annotations

import torch

from ...ops import switches
from ...ops.transform_kernel import DTYPES, INTERPRET, triton

if triton is not None:
    import triton.language as tl

BLOCK_L = 64  # positions per step of the loop


def available(query: torch.Tensor, disabled: frozenset[str] = frozenset()) -> bool:
    """Whether the kernel serves this decode step (CUDA, Triton, a float dtype, not disabled: else the
    masked SDPA path); under TRITON_INTERPRET=1 decode_attention() also runs on CPU tensors, chosen there
    only inside switches.interpreted() (tests)."""
    ready = triton is not None and switches.runs_here(query) and query.dtype in DTYPES
    return ready and switches.enabled("decode_attention", disabled)


if triton is not None:
    # fmt: off
    @triton.jit
    def _decode_attention_kernel(Q, K, V, OUT, LENGTHS, scale,
                                 stride_qb, stride_qh, stride_kb, stride_kl, stride_kh, stride_ob, stride_oh,
                                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr,
                                 UPCAST: tl.constexpr):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(LENGTHS + b)
        group = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, BLOCK_D)
        head_ok = (group < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
        heads = kv_head * GROUP + group
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=head_ok, other=0.0)
        if UPCAST:  # Triton's interpreter multiplies bf16 wrongly: use fp32 there
            q = q.to(tl.float32)
        best = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        slot = b * stride_kb + kv_head * stride_kh
        for start in range(0, length, BLOCK_L):
            positions = start + tl.arange(0, BLOCK_L)
            seen = positions < length
            tile = seen[:, None] & (dims < HEAD_DIM)[None, :]
            offsets = slot + positions[:, None] * stride_kl + dims[None, :]
            k = tl.load(K + offsets, mask=tile, other=0.0)
            v = tl.load(V + offsets, mask=tile, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BG, BL) fp32
            scores = tl.where(seen[None, :], scores, float("-inf"))
            newest = tl.maximum(best, tl.max(scores, axis=1))
            decay = tl.exp(best - newest)
            weights = tl.exp(scores - newest[:, None])
            total = total * decay + tl.sum(weights, axis=1)
            acc = acc * decay[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
            best = newest
        out = acc / total[:, None]
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + dims[None, :], out.to(OUT.dtype.element_ty),
                 mask=head_ok)
    # fmt: on


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """query (B, H, D), one token per row; keys/values (≥ B, L, KVH, D), batch row b reading slot b;
    lengths (B,) integer, 1 ≤ lengths[b] ≤ L: the positions row b sees → (B, H, D) in query's dtype."""
    batch, heads, dim = query.shape
    kv_heads = keys.shape[2]
    if heads % kv_heads or keys.shape != values.shape or keys.stride() != values.stride():
        raise ValueError(
            f"{heads} query heads over keys {tuple(keys.shape)} and values {tuple(values.shape)}"
        )
    query = query if query.stride(-1) == 1 else query.contiguous()
    if keys.stride(-1) != 1:
        raise ValueError("the cache's keys and values need a contiguous last dimension")
    group = heads // kv_heads
    out = torch.empty((batch, heads, dim), device=query.device, dtype=query.dtype)
    _decode_attention_kernel[(batch, kv_heads)](
        query, keys, values, out, lengths.contiguous(), scale,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=dim, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_L=16 if INTERPRET else BLOCK_L,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", UPCAST=INTERPRET,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
