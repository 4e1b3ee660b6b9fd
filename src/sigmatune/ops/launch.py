"""Launching a Triton kernel from eager code without the JIT's per-call work.

`kernel[grid](*args, **constants)` binds the arguments, derives their specialisation, hashes a cache key,
checks the globals the kernel read and builds launch metadata on every call: tens of µs of host time,
paid twice per adapted layer and training step (forward and backward), hundreds of times a step. A
CachedLaunch does that once per specialisation and then calls the compiled kernel's launcher directly.

Its key is finer than the JIT's: each tensor's dtype and whether its address is 16-byte aligned (what the
JIT specialises a tensor on), every other argument by its value (the JIT specialises an integer on whether it
is 1, a multiple of 16 or needs 64 bits: properties of the value), plus the constants and launch options.
Two calls with one key therefore run one binary. Keying integers by value costs one JIT call per new size
(the JIT finds the binary it compiled) and keeps the key cheap to build: no function call per argument. At
most MAX_KEYS keys are kept. Tensors reach the launcher as their addresses (integers), so it neither calls
data_ptr() nor asks the driver about each pointer (cuPointerGetAttribute); the caller holds the tensors
until the launch is queued. Under Triton's interpreter, or with Triton's launch hooks set (a profiler),
every call goes through the JIT.
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton import knobs
except ImportError:  # no Triton: nothing is launched
    triton = None


def _hooked() -> bool:
    """Whether a launch hook is set (Triton 3.6 keeps a chain of them, empty when none is)."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


MAX_KEYS = 4096  # sizes seen (N varies with the batch); past this the cache starts over


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
        values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]  # tensors by address
        key = (
            device, warps, stages, *constants.values(),
            *[(a.dtype, v % 16 == 0) if isinstance(a, torch.Tensor) else v for a, v in zip(args, values, strict=True)],
        )  # fmt: skip
        compiled = self.compiled.get(key)
        if compiled is None:  # the JIT compiles (or finds) the binary, and launches it this once
            if len(self.compiled) >= MAX_KEYS:
                self.compiled.clear()
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
            None, None, *values, *constants.values(),
        )  # fmt: skip
