"""What does one adapted layer's forward + backward cost the host (CPU) and the GPU, per path, against the base
layer alone, and which pieces make up an eager call?

    python benchmarks/layer_overhead.py [--n 4096] [--d 2048] [--rank 64] [--out results/layer_overhead.json]

Eager training of a model with hundreds of adapted layers is bound by whichever is slower: the CPU
issuing kernels or the GPU running them. "cpu us" is the time to issue one call (the GPU held busy by a
sleep meanwhile, so nothing waits on it); "gpu us" the GPU's time per call, the calls back to back
(common.host_and_gpu_us; on a CPU both are wall time, the kernel run by Triton's interpreter).
Rows: the bare nn.Linear, a SpectralLinear (what a SigmaModel trains) through core/linear's one-node Function on
the fused kernel, by torch ops (its path on the torch backend), the transform alone (core/transform.transform:
an autograd.Function) and as the custom op that torch.compile sees (ops/library.py) before the base layer, and
the pieces: a launch of the forward kernel, the same launch through Triton's JIT, an empty autograd.Function,
an allocation.
"""

from __future__ import annotations

from types import SimpleNamespace

import common
import torch
import triton

from sigmatune import SpectralLinear


def internals() -> SimpleNamespace:
    """The sigmatune internals this script times, in one place."""
    from sigmatune.core.svd import Spectrum
    from sigmatune.core.transform import transform
    from sigmatune.ops import library, transform_kernel
    from sigmatune.ops.backends import using

    def through_jit(x, basis, g):
        """transform_kernel.fused_transform with its launch taken by kernel[grid](...) every time (as under launch
        hooks): the private transform_kernel._launch_transform is the kernel's CachedLaunch."""
        launch = transform_kernel._launch_transform
        interpret, launch.interpret = launch.interpret, True
        try:
            transform_kernel.fused_transform(x, basis, g)
        finally:
            launch.interpret = interpret

    return SimpleNamespace(
        Spectrum=Spectrum,
        transform=transform,  # the autograd.Function
        kernel=transform_kernel.fused_transform,  # one launch: (out, projection, grad)
        custom_op=library.transform_op,  # what torch.compile sees
        using=using,  # one backend for a block
        through_jit=through_jit,
    )


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        return grad


def python_profile(fn, calls: int, top: int = 30) -> None:
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
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


@torch.no_grad()
def no_grad(layer, x):
    return layer(x)


def adapted_layer(linear, rank: int, ops: SimpleNamespace) -> SpectralLinear:
    d, device = linear.in_features, linear.weight.device
    spectrum = ops.Spectrum(
        basis=torch.linalg.qr(torch.randn(d, rank, device=device)).Q,
        sigma=torch.linspace(2, 1, rank, device=device),
        indices=torch.arange(rank, device=device),
        sigma_max=torch.tensor(2.0, device=device),
    )
    layer = SpectralLinear(linear, spectrum)
    layer.add_adapter("default", list(range(rank)), "multiplicative", init="normal", init_std=0.01)
    layer.set_adapter("default")
    return layer


def main():
    options = common.parser(__doc__, out="layer_overhead.json")
    options.add_argument("--n", type=int, default=4096)
    options.add_argument("--d", type=int, default=2048)
    options.add_argument("--rank", type=int, default=64)
    options.add_argument("--calls", type=int, default=40, help="calls per round (all fit in the GPU's queue)")
    options.add_argument("--repeats", type=int, default=5, help="rounds: each row's least is kept")
    options.add_argument("--profile", action="store_true", help="cProfile the adapted layer's calls")
    args = options.parse_args()
    print(f"triton {triton.__version__}: launch_enter_hook {triton.knobs.runtime.launch_enter_hook!r}")
    ops = internals()
    device = common.pick_device(args.device)
    torch.manual_seed(0)
    linear = torch.nn.Linear(args.d, args.d, bias=False, device=device, dtype=torch.bfloat16)
    linear.requires_grad_(False)
    layer = adapted_layer(linear, args.rank, ops)
    x = torch.randn(args.n, args.d, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.n, args.d, device=device, dtype=torch.bfloat16)
    basis = layer.sigma_basis
    vector = layer.sigma_adapters["default"].vector
    g = vector.detach()
    saved = ops.kernel(x.detach(), basis, g)[1]

    def by_torch_ops():
        with ops.using("torch"):
            layer(x).backward(grad)

    rows = {
        "base layer forward + backward": lambda: linear(x).backward(grad),
        "adapted, fused kernel": lambda: layer(x).backward(grad),
        "adapted, torch ops": by_torch_ops,
        "transform() + base layer": lambda: linear(ops.transform(x, basis, vector)).backward(grad),
        "custom op + base layer": lambda: linear(ops.custom_op(x, basis, vector, None, True)[0]).backward(
            grad
        ),
        "base layer forward": lambda: linear(x.detach()),
        "kernel forward (one launch)": lambda: ops.kernel(x.detach(), basis, g),
        "kernel forward through the JIT": lambda: ops.through_jit(x.detach(), basis, g),
        "kernel backward (launch + reduction)": lambda: ops.kernel(grad, basis, g, saved=saved),
        "adapted layer forward, no grad": lambda: no_grad(layer, x),
        "empty autograd.Function fwd + bwd": lambda: _Identity.apply(x).backward(grad),
        "torch.empty (N, d)": lambda: torch.empty_like(grad),
    }
    results = []
    for name, fn in rows.items():
        cpu, gpu = common.host_and_gpu_us(fn, device, args.calls, args.repeats)
        results.append({"row": name, "cpu_us": round(cpu, 1), "gpu_us": round(gpu, 1)})
        print(f"{name:<40} cpu {cpu:8.1f} us   gpu {gpu:8.1f} us", flush=True)
    if args.profile:
        python_profile(rows["adapted, fused kernel"], args.calls)
    print(f"adapted fused / base (cpu): {results[1]['cpu_us'] / results[0]['cpu_us']:.2f}x")
    facts = dict(
        n=args.n, d=args.d, rank=args.rank, device=common.device_name(device), torch=torch.__version__
    )
    common.write_json(args.out, {"facts": facts, "rows": results})


if __name__ == "__main__":
    main()
