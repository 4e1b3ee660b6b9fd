"""Launching a Triton kernel from eager code without the JIT's per-call work.

`kernel[grid](*args, **constants)` binds the arguments, derives their specialisation, hashes a cache key,
checks the globals the kernel read and builds launch metadata on every call: tens of µs of host time,
paid twice per adapted layer and training step (forward and backward), hundreds of times a step. A
CachedLaunch does that once per specialisation and then calls the compiled kernel's launcher directly.

Its key is finer than the JIT's: every property the JIT specialises a kernel on (each tensor's dtype and
whether its address is 16-byte aligned, whether each integer is 1 or a multiple of 16 or needs 64 bits),
plus the constants and launch options. Two calls with one key therefore run one binary. Under Triton's
interpreter, or with Triton's launch hooks set (a profiler), every call goes through the JIT.
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton import knobs
except ImportError:  # no Triton: nothing is launched
    triton = None


def _specialisation(value) -> object:
    """What the JIT tells apart in one runtime argument."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, int):
        return value == 1, value % 16 == 0, not -(2**31) <= value < 2**31
    return type(value)


def _hooked() -> bool:
    """Whether a launch hook is set (Triton 3.6 keeps a chain of them, empty when none is)."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class CachedLaunch:
    """One @triton.jit kernel, launched through its compiled launcher after the first call per key."""

    def __init__(self, kernel, interpret: bool):
        self.kernel = kernel
        self.interpret = interpret
        self.compiled: dict[tuple, object] = {}

    def __call__(self, grid: tuple[int, ...], args: tuple, constants: dict, warps: int, stages: int) -> None:
        """kernel[grid](*args, **constants, num_warps=warps, num_stages=stages), with args the runtime
        arguments in the kernel's order and constants its constexpr ones (given after them)."""
        if self.interpret or _hooked():
            self.kernel[grid](*args, **constants, num_warps=warps, num_stages=stages)
            return
        device = args[0].device.index
        key = (device, warps, stages, *constants.values(), *map(_specialisation, args))
        compiled = self.compiled.get(key)
        if compiled is None:  # the JIT compiles (or finds) the binary, and launches it this once
            names = self.kernel.arg_names
            if names != names[: len(args)] + list(constants):
                raise TypeError(
                    f"{self.kernel.__name__}: pass the constants in the kernel's order, after {names[: len(args)]}"
                )
            self.compiled[key] = self.kernel[grid](*args, **constants, num_warps=warps, num_stages=stages)
            return
        stream = torch._C._cuda_getCurrentRawStream(device)
        grid = (*grid, 1, 1)
        compiled.run(
            grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None,
            None, None, *args, *constants.values(),
        )  # fmt: skip
