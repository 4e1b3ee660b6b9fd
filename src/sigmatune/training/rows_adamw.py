"""AdamW over stacked adapters: one learning rate per leading row, each row clipped by its own norm.

Adapters trained together (model/together.py) live as rows of one tensor per layer, C (K, …). Row k is
adapter k, so what the loop does to one adapter's parameters it does here to row k of every tensor:

    n_k      = ‖(∂L_k/∂C_l[k])_l‖₂ over all layers l           each adapter's own gradient norm
    clip_k   = min(1, max_norm / (n_k + 1e-6))                  as torch.nn.utils.clip_grad_norm_
    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²              torch.optim.AdamW's moments
    C[k] ← C[k] − lr_k · (m̂ / (√v̂ + ε))[k],   lr_k = lr · scale_k

with torch.optim.AdamW's bias corrections and no weight decay (the loop's), so each row takes the steps it
would take alone. A row whose scale is 0 (an adapter that stopped) does not move. Under FSDP2 the tensors
are sharded by rows (DTensors): the per-row factors are sharded alike.
"""

from __future__ import annotations

import torch


class RowsAdamW(torch.optim.Optimizer):
    """AdamW over tensors whose leading dimension is K adapters; `scales` (K,) multiplies the group's lr
    per row (an adapter's own learning rate ÷ lr)."""

    def __init__(self, params, scales: torch.Tensor, lr=1.0, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.scales = scales.double()  # (K,)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every tensor that has a gradient, as torch's foreach AdamW takes it: a few launches
        over all of them (many small kernels would cost more than the math), then the per-row step sizes."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:  # (every member failed this step: nothing was differentiated)
                continue
            states = [self._state_of(p) for p in params]
            grads = [p.grad for p in params]
            ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            for state in states:
                state["step"] += 1
            steps = [float(state["step"]) for state in states]
            torch._foreach_lerp_(ms, grads, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_div_(denoms, [(1 - beta2**step) ** 0.5 for step in steps])
            torch._foreach_add_(denoms, group["eps"])
            updates = torch._foreach_div(ms, denoms)
            kinds = [(step, p.dtype, p.dim()) for p, step in zip(params, steps, strict=True)]
            sizes = {}  # the per-row step sizes (K, 1, …), once per kind of tensor
            for kind, p in zip(kinds, params, strict=True):
                if kind not in sizes:
                    sizes[kind] = _per_row(group["lr"] * self.scales / (1 - beta1 ** kind[0]), p)
            torch._foreach_mul_(updates, [sizes[kind] for kind in kinds])
            torch._foreach_sub_(params, updates)

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state


def clip_rows(tensors: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each row's gradient (row k of every tensor's .grad together) to max_norm, as
    clip_grad_norm_ clips one adapter's; returns the norms before clipping (K,), NaN for a row whose
    gradient is not finite (that row is left to the caller)."""
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return torch.zeros(0)
    squares = sum(_local(g).double().square().flatten(1).sum(dim=1) for g in grads)  # this process's rows
    norms = _all_rows(squares, grads[0]).sqrt()  # (K,)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    rows: dict[tuple, torch.Tensor] = {}
    for g in grads:
        if (g.dtype, g.dim()) not in rows:
            rows[g.dtype, g.dim()] = _per_row(factor, g)  # (K, 1, …): once per kind of tensor
    torch._foreach_mul_(grads, [rows[g.dtype, g.dim()] for g in grads])
    return norms


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) → (K, 1, …) in like's dtype and device, to broadcast over like (K, …); a DTensor sharded as like
    is when like is one."""
    rows = values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))
    if _is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(rows, like.device_mesh, like.placements)
    return rows


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's rows of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _all_rows(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row values (K,) of every process, from this process's rows of tensors sharded as `like`."""
    if not _is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    rows = like.shape[0]  # shards may be uneven (K not a multiple of the processes), some even empty
    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=(rows,), stride=(1,)
    ).full_tensor()
