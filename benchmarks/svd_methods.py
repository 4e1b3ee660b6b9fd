"""How long do the exact bases of a full-spectrum adapter take to compute, per method and layer shape?

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

import json
from types import SimpleNamespace

import common
import torch


def internals() -> SimpleNamespace:
    """The sigmatune internals this script times, in one place."""
    from sigmatune.core import svd

    return SimpleNamespace(exact_side=svd.exact_side, side_for=svd.side_for)


def gram_eigh(weights: torch.Tensor, dtype: torch.dtype, input_side: bool):
    wide = weights.to(dtype)
    return torch.linalg.eigh(wide.mT @ wide if input_side else wide @ wide.mT)


def main() -> None:
    options = common.parser(__doc__, out="svd_methods.json")
    options.add_argument("--shape", choices=common.SHAPES, default="1.1b")
    options.add_argument("--batch", type=int, default=4)
    args = options.parse_args()
    ops = internals()
    device = common.pick_device(args.device)
    torch.manual_seed(0)
    rows = []
    for out_features, in_features, layers in common.weight_shapes(args.shape):
        weights = torch.randn(args.batch, out_features, in_features, device=device).bfloat16().float() * 0.02
        input_side = ops.side_for(out_features, in_features) == "input"
        methods = {
            "svd-fp32": lambda w=weights: torch.linalg.svd(w, full_matrices=False),
            "eigh-fp64": lambda w=weights, s=input_side: gram_eigh(w, torch.float64, s),
            "eigh-fp32": lambda w=weights, s=input_side: gram_eigh(w, torch.float32, s),
            "exact_side": lambda w=weights, s=input_side: ops.exact_side(w, s),
        }
        row = dict(out=out_features, in_=in_features, layers=layers, batch=args.batch)
        for name, fn in methods.items():
            row[name] = round(common.warm_seconds(fn) / args.batch, 4)
        row["model_s"] = round(row["exact_side"] * layers, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = sum(r["model_s"] for r in rows)
    print(f"\n{args.shape}: every basis by exact_side in {total:.1f} s (svd-fp32: "
          f"{sum(r['svd-fp32'] * r['layers'] for r in rows):.1f} s)")  # fmt: skip
    facts = dict(shape=args.shape, device=common.device_name(device))
    common.write_json(args.out, {"facts": facts, "rows": rows, "total_s": round(total, 2)})


if __name__ == "__main__":
    main()
