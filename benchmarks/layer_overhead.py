"""CPU and GPU cost of one adapted layer's forward + backward, per path, against the base layer alone.

    python benchmarks/layer_overhead.py [--n 4096] [--d 2048] [--rank 64]

Eager training of a model with hundreds of adapted layers is bound by whichever is slower: the CPU
issuing kernels or the GPU running them. "cpu us" is the time to issue one forward + backward
(no synchronisation); "gpu us" is the time per call once the queue is drained, over many calls.
"""

from __future__ import annotations

import argparse
import time

import torch

from sigmatune.core import functional as F
from sigmatune.core import kernels


def run(name, fn, x, calls=200):
    for _ in range(10):
        fn(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    print(f"{name:<28} cpu {1e6 * issued / calls:8.1f} us   gpu {1e6 * total / calls:8.1f} us")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    linear = torch.nn.Linear(args.d, args.d, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(
        False
    )
    basis = torch.linalg.qr(torch.randn(args.d, args.rank, device="cuda")).Q.to(torch.bfloat16)
    g = torch.zeros(args.rank, device="cuda", requires_grad=True)
    x = torch.randn(args.n, args.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.n, args.d, device="cuda", dtype=torch.bfloat16)

    def base(x):
        linear(x).backward(grad)

    def adapted(x):
        linear(F.transform(x, basis, g)).backward(grad)

    run("base layer", base, x)
    available = kernels.available
    kernels.available = lambda *_: False
    run("adapted, GEMM path", adapted, x)
    kernels.available = available
    run("adapted, fused kernel", adapted, x)
    run("kernel forward only", lambda x: kernels.transform(x, basis, g), x.detach())


if __name__ == "__main__":
    main()
