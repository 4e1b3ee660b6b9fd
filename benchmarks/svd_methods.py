"""How long the exact bases of a full-spectrum adapter take to compute, per method and layer shape.

    python benchmarks/svd_methods.py [--shape 1.1b|7b] [--batch 4] [--out results/svd_methods.json]

The full spectrum needs every singular direction of one side of every targeted weight (core/svd.py). Per
weight shape of the model (random bf16 weights, batches of --batch layers), the seconds per layer of:
  svd-fp32     torch.linalg.svd of the weights (what init used before)
  eigh-fp64    torch.linalg.eigh of the stored side's Gram matrix in fp64 (what svd.exact_side does first)
  eigh-fp32    the same in fp32 (squaring σ loses the small ones' digits: not used, for comparison)
  exact_side   svd.exact_side as init calls it: fp64 Gram, eigh, the residual and orthogonality checks
Each is run once untimed first (cuSOLVER's set-up) and timed on the next call. The last column is the
whole model's time by exact_side: layers of that shape × seconds per layer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sigmatune.core.svd import exact_side, side_for

# shape → [(out, in, layers of that shape)] over the 7 linear types of a Llama decoder
SHAPES = {
    "1.1b": [(2048, 2048, 44), (256, 2048, 44), (5632, 2048, 44), (2048, 5632, 22)],
    "7b": [(4096, 4096, 128), (11008, 4096, 64), (4096, 11008, 32)],
    "tiny": [(64, 64, 4), (160, 64, 4)],
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def gram_eigh(weights: torch.Tensor, dtype: torch.dtype, input_side: bool):
    wide = weights.to(dtype)
    return torch.linalg.eigh(wide.mT @ wide if input_side else wide @ wide.mT)


def seconds(fn) -> float:
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default="1.1b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for out_features, in_features, layers in SHAPES[args.shape]:
        weights = torch.randn(args.batch, out_features, in_features, device=DEVICE).bfloat16().float() * 0.02
        input_side = side_for(out_features, in_features) == "input"
        methods = {
            "svd-fp32": lambda w=weights: torch.linalg.svd(w, full_matrices=False),
            "eigh-fp64": lambda w=weights, s=input_side: gram_eigh(w, torch.float64, s),
            "eigh-fp32": lambda w=weights, s=input_side: gram_eigh(w, torch.float32, s),
            "exact_side": lambda w=weights, s=input_side: exact_side(w, s),
        }
        row = dict(out=out_features, in_=in_features, layers=layers, batch=args.batch)
        for name, fn in methods.items():
            row[name] = round(seconds(fn) / args.batch, 4)
        row["model_s"] = round(row["exact_side"] * layers, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = sum(r["model_s"] for r in rows)
    print(f"\n{args.shape}: every basis by exact_side in {total:.1f} s (svd-fp32: "
          f"{sum(r['svd-fp32'] * r['layers'] for r in rows):.1f} s)")  # fmt: skip
    if args.out:
        facts = dict(shape=args.shape, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
        args.out.write_text(
            json.dumps({"facts": facts, "rows": rows, "total_s": round(total, 2)}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
