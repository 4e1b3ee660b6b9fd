"""The one switch of the fast paths: SIGMATUNE_DISABLE_KERNELS, read once, here and nowhere else.

    SIGMATUNE_DISABLE_KERNELS=transform,band     the fused transform and the band kernels off (torch instead)
    SIGMATUNE_DISABLE_KERNELS=all                every kernel off: the plain torch method everywhere

Each name turns off one fast path; what replaces it is the next backend that serves the call (the plain
torch op last), so the results are the same up to rounding. A model or a bank turns kernels off for itself
too (SigmaModel.disable_kernels, AdapterBank(disable_kernels=...)): those names travel with each call
(backends.Call.disabled) and are checked here beside the environment's.
"""

from __future__ import annotations

import contextlib
import os

KERNELS = {
    "transform": "the fused Triton transform, forward and backward (eager, and under torch.compile)",
    "band": "the Triton band mixes and reductions of the GEMM path (wide bands, the full spectrum's dg)",
    "rows": "serving: the mixed-batch kernel (each row's scales gathered by id inside it)",
    "shared_projection": "serving: the mixed-batch kernel's split projection at r ≤ 32",
    "fold": "serving: a group's projections folded into its first layer's GEMM",
    "decode_attention": "serving: the Triton decode attention over the slots",
}
VARIABLE = "SIGMATUNE_DISABLE_KERNELS"


def parse(text: str | None) -> frozenset[str]:
    """The kernel names a value of SIGMATUNE_DISABLE_KERNELS turns off ("all": every one)."""
    names = {name.strip() for name in (text or "").split(",") if name.strip()}
    if "all" in names:
        return frozenset(KERNELS)
    unknown = sorted(names - set(KERNELS))
    if unknown:
        raise ValueError(
            f"{VARIABLE} names unknown kernels {unknown}; the names are {', '.join(KERNELS)} (or all)"
        )
    return frozenset(names)


def checked(names) -> frozenset[str]:
    """A model's or a bank's own names, checked as the variable's are."""
    return parse(",".join(names))


DISABLED = parse(os.environ.get(VARIABLE))  # read once, at import


def enabled(name: str, disabled: frozenset[str] = frozenset()) -> bool:
    """Whether kernel `name` may run: neither the environment nor the caller's names turn it off."""
    return name not in DISABLED and name not in disabled


_interpreted = False  # interpreted(): the serving kernels take CPU tensors under Triton's interpreter


def runs_here(tensor) -> bool:
    """Whether a serving kernel runs on this tensor's device: CUDA, or the CPU inside interpreted()."""
    return tensor.is_cuda or (_interpreted and os.environ.get("TRITON_INTERPRET") == "1")


@contextlib.contextmanager
def interpreted():
    """Within the block, under Triton's interpreter (TRITON_INTERPRET=1), the serving kernels serve CPU
    tensors as they do CUDA ones (tests; training's kernels are chosen with backends.using)."""
    global _interpreted
    previous, _interpreted = _interpreted, True
    try:
        yield
    finally:
        _interpreted = previous
