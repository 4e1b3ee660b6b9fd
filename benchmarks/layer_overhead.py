"""Host (CPU) and GPU cost of one adapted layer's forward + backward, per path, against the base layer alone,
and the pieces an eager call is made of.

    python benchmarks/layer_overhead.py [--n 4096] [--d 2048] [--rank 64] [--out results/layer_overhead.json]

Eager training of a model with hundreds of adapted layers is bound by whichever is slower: the CPU
issuing kernels or the GPU running them. "cpu us" is the time to issue one call (the GPU held busy by a
sleep meanwhile, so nothing waits on it); "gpu us" the GPU's time per call, the calls back to back.
Rows: the bare nn.Linear, a SpectralLinear (what a SigmaModel trains) through fused_linear's one-node Function on
the fused kernel, by torch ops (its path where the kernel does not serve), through the Function on GEMMs, the
transform alone (functional.transform: an autograd.Function) and as the custom op that
torch.compile sees (transform_op.py) before the base layer, and the pieces: a launch of the forward kernel,
an empty autograd.Function, an allocation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sigmatune.core import functional as F
from sigmatune.core import fused_linear, kernels, launcher, transform_op
from sigmatune.core.layer import SpectralLinear
from sigmatune.core.svd import Spectrum

CALLS = 40  # few enough that every launch fits in the GPU's queue while it sleeps
SLEEP_MS = 150
CYCLES_PER_S = 1.98e9  # the H200's boost clock: torch.cuda._sleep counts cycles


def timed(fn, calls=CALLS, repeats=5) -> tuple[float, float]:
    """(cpu µs, gpu µs) per call, the least of `repeats` rounds of `calls` calls after 10 untimed calls. In
    each round the GPU first sleeps for SLEEP_MS, so that the calls only queue while the CPU issues them:
    cpu µs is the host's cost alone, gpu µs the time from the end of the sleep to the end of the last call
    (the calls back to back) over the calls."""
    for _ in range(10):
        fn()
    cpu, gpu = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(SLEEP_MS * 1e-3 * CYCLES_PER_S))
        begin.record()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter() - start
        end.record()
        torch.cuda.synchronize()
        if 1e3 * issued > 0.8 * SLEEP_MS:
            print(f"  (issuing took {1e3 * issued:.0f} ms, as long as the sleep: gpu µs includes idle time)")
        cpu.append(1e6 * issued / calls)
        gpu.append(1e3 * begin.elapsed_time(end) / calls)
    return min(cpu), min(gpu)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        return grad


def through_jit(x, basis, g):
    """kernels.transform with its launch taken by kernel[grid](...) every time (as under launch hooks)."""
    launch = kernels._launch_transform
    launch.interpret = True
    try:
        kernels.transform(x, basis, g)
    finally:
        launch.interpret = False


def python_profile(fn, calls=CALLS, top=30) -> None:
    """Where an adapted layer's host time goes: cProfile over `calls` calls, the backward pass on this thread
    (autograd's device threads are invisible to cProfile), the functions with the most time of their own."""
    import cProfile
    import pstats

    torch.autograd.set_multithreading_enabled(False)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.autograd.set_multithreading_enabled(True)
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


@torch.no_grad()
def no_grad(layer, x):
    return layer(x)


def adapted_layer(linear, rank: int) -> SpectralLinear:
    d = linear.in_features
    basis = torch.linalg.qr(torch.randn(d, rank, device="cuda")).Q
    spectrum = Spectrum(
        basis=basis,
        sigma=torch.linspace(2, 1, rank, device="cuda"),
        indices=torch.arange(rank, device="cuda"),
        sigma_max=torch.tensor(2.0, device="cuda"),
    )
    layer = SpectralLinear(linear, spectrum)
    layer.add_adapter("default", list(range(rank)), "multiplicative", init="normal", init_std=0.01)
    layer.set_adapter("default")
    return layer


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile the adapted layer's calls")
    args = parser.parse_args()
    hook = launcher.knobs.runtime.launch_enter_hook
    print(f"triton {launcher.triton.__version__}: launch_enter_hook {hook!r}, hooked: {launcher._hooked()}")
    torch.manual_seed(0)
    linear = torch.nn.Linear(args.d, args.d, bias=False, device="cuda", dtype=torch.bfloat16)
    linear.requires_grad_(False)
    layer = adapted_layer(linear, args.rank)
    x = torch.randn(args.n, args.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.n, args.d, device="cuda", dtype=torch.bfloat16)
    basis = layer.sigma_basis
    vector = layer.sigma_adapters["default"].vector
    g = vector.detach()
    saved = kernels.transform(x.detach(), basis, g)[1]

    def without_kernel(ops: bool):
        """The layer where the kernel does not serve: by torch ops, or through fused_linear's Function on GEMMs."""
        eager_ops, enabled = fused_linear.EAGER_OPS, kernels.ENABLED
        fused_linear.EAGER_OPS, kernels.ENABLED = ops, False
        try:
            layer(x).backward(grad)
        finally:
            fused_linear.EAGER_OPS, kernels.ENABLED = eager_ops, enabled

    rows = {
        "base layer forward + backward": lambda: linear(x).backward(grad),
        "adapted, fused kernel": lambda: layer(x).backward(grad),
        "adapted, torch ops": lambda: without_kernel(ops=True),
        "adapted, GEMM path": lambda: without_kernel(ops=False),
        "transform() + base layer": lambda: linear(F.transform(x, basis, vector)).backward(grad),
        "custom op + base layer": lambda: linear(
            transform_op.transform(x, basis, vector, None, True)[0]
        ).backward(grad),
        "base layer forward": lambda: linear(x.detach()),
        "kernel forward (one launch)": lambda: kernels.transform(x.detach(), basis, g),
        "kernel forward through the JIT": lambda: through_jit(x.detach(), basis, g),
        "kernel backward (launch + reduction)": lambda: kernels.transform(grad, basis, g, saved=saved),
        "adapted layer forward, no grad": lambda: no_grad(layer, x),
        "empty autograd.Function fwd + bwd": lambda: _Identity.apply(x).backward(grad),
        "torch.empty (N, d)": lambda: torch.empty_like(grad),
    }
    results = []
    for name, fn in rows.items():
        cpu, gpu = timed(fn)
        results.append({"row": name, "cpu_us": round(cpu, 1), "gpu_us": round(gpu, 1)})
        print(f"{name:<40} cpu {cpu:8.1f} us   gpu {gpu:8.1f} us", flush=True)
    if args.profile:
        python_profile(rows["adapted, fused kernel"])
    base = results[0]["cpu_us"]
    print(f"adapted fused / base (cpu): {results[1]['cpu_us'] / base:.2f}x")
    if args.out:
        device = torch.cuda.get_device_name()
        facts = dict(vars(args), out=None, device=device, torch=torch.__version__)
        args.out.write_text(json.dumps({"facts": facts, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
