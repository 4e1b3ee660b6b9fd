"""What do sigmatune's step and memory cost on a 4-bit / 8-bit base, against PEFT LoRA on the same base
(QLoRA-style)? Every row in one process on one GPU.

    python benchmarks/quantized.py [--shape 1.1b] [--tokens 4x1024] [--schemes bf16,bnb-nf4,...] [--compiled bnb-nf4]
    python benchmarks/quantized.py --rows scheme:method:rank[:c],...

Bases, each built from the same random bf16 Llama-shaped model (common.SHAPES):
  bf16      the unquantized model (the reference for memory)
  bnb-nf4   bitsandbytes 4-bit NF4, compute bf16, double quantization (transformers' load_in_4bit path)
  bnb-int8  bitsandbytes LLM.int8() (load_in_8bit)
  ao-int8   torchao weight-only int8 (quantize_ with Int8WeightOnlyConfig)
  ao-int4   torchao weight-only int4, group 128 (IntxWeightOnlyConfig: tinygemm's Int4WeightOnlyConfig
            kernel has no backward, so neither LoRA nor a frozen model with input gradients can train on it)
Rows per base: frozen (input gradients on), sigmatune r=16 and r=64 (bases from the dequantized
weights), PEFT LoRA r=16 (alpha 32, no prepare_model_for_kbit_training, so that only the adapter
differs). Per row: init seconds (cold; and warm from the basis cache), trainable parameters, GiB the
adapter adds to the resident model, median step ms (forward + backward + AdamW) and its ratio to the
frozen row of the same base, peak allocated GiB and its ratio. A scheme whose library is missing, or a
row that fails, is reported and skipped. Rows are merged into results/quantized.json.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
from pathlib import Path

import common
import torch

KEY = ("shape", "scheme", "method", "rank", "compiled", "tokens")
SCHEMES = ["bf16", "bnb-nf4", "bnb-int8", "ao-int8", "ao-int4"]
METHODS = [("frozen", 0), ("sigmatune", 16), ("sigmatune", 64), ("lora", 16)]


def quantized_base(scheme: str, shape: str, device: torch.device, scratch: Path):
    """The shape's random bf16 model with every decoder linear quantized by the scheme."""
    if scheme == "bf16":
        return common.build(shape, device)
    if scheme.startswith("bnb-"):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        folder = scratch / f"{shape}-bf16"
        if not folder.exists():
            common.build(shape, device).save_pretrained(folder)
            settled_memory(device)
        if scheme == "bnb-nf4":
            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
        else:
            quantization = BitsAndBytesConfig(load_in_8bit=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            quantization_config=quantization,
            dtype=torch.bfloat16,
            device_map={"": 0 if device.type == "cuda" else "cpu"},
        )
        return model.requires_grad_(False)
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_

    if scheme == "ao-int8":
        config = Int8WeightOnlyConfig()
    else:  # dequantize-then-matmul int4 (differentiable: tinygemm's int4 kernel has no backward)
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128))
    model = common.build(shape, device)
    quantize_(model.model.layers, config)  # decoder linears only; embeddings and lm_head stay bf16
    return model


def settled_memory(device: torch.device) -> float:
    """GiB allocated once garbage (e.g. the bf16 weights a quantizer replaced) is freed (NaN on a CPU)."""
    gc.collect()
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


def main() -> None:
    options = common.parser(__doc__, out="quantized.json")
    options.add_argument("--shape", choices=common.SHAPES, default="1.1b")
    options.add_argument("--tokens", default="4x1024", help="batch x sequence length")
    options.add_argument("--schemes", default=",".join(SCHEMES))
    options.add_argument(
        "--compiled", default="", help="schemes also measured under torch.compile, e.g. bnb-nf4"
    )
    options.add_argument(
        "--rows", help="instead: scheme:method:rank[:c],... (c = compiled; add a frozen row for ratios)"
    )
    options.add_argument("--warmup", type=int, default=3, help="untimed steps per row")
    options.add_argument("--steps", type=int, default=7, help="timed steps per row")
    args = options.parse_args()
    device = common.pick_device(args.device)
    scratch = Path(tempfile.mkdtemp(prefix="quantized-bench-"))
    plan = planned_rows(args.rows, args.schemes.split(","), args.compiled.split(","))
    results = []
    for scheme in dict.fromkeys(scheme for scheme, *_ in plan):
        try:
            base = quantized_base(scheme, args.shape, device, scratch)
        except Exception as err:  # the library is missing, or cannot quantize here
            print(f"{scheme}: SKIPPED {type(err).__name__}: {err}"[:1500], flush=True)
            continue
        resident = settled_memory(device)
        print(f"{scheme}: base resident {resident:.2f} GiB", flush=True)
        frozen = {}
        for _, method, rank, compiled in (row for row in plan if row[0] == scheme):
            row = measure_row(base, method, rank, compiled, args)
            if row is None:
                print(f"{scheme} {method} r={rank} compiled={compiled}: no result", flush=True)
                continue
            if method == "frozen":
                frozen[compiled] = row
            reference = frozen.get(compiled)
            row.update(
                shape=args.shape, scheme=scheme, tokens=row.pop("tokens"), resident_gib=round(resident, 3),
                ratio_vs_frozen=round(row["step_ms"] / reference["step_ms"], 3) if reference else None,
                peak_ratio_vs_frozen=round(row["peak_gib"] / reference["peak_gib"], 3) if reference else None,
                device=common.device_name(device),
            )  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
            common.merge_rows(
                args.out, results, KEY
            )  # after every row: a run cut short keeps what it measured
        del base
        settled_memory(device)
    print(markdown(results))


def planned_rows(rows: str | None, schemes: list[str], compiled: list[str]) -> list[tuple]:
    """(scheme, method, rank, compiled) in run order: per scheme, eager then compiled, frozen first."""
    if rows:
        plan = [(p[0], p[1], int(p[2]), p[3:] == ["c"]) for p in (r.split(":") for r in rows.split(","))]
    else:
        plan = [(s, m, r, False) for s in schemes for m, r in METHODS]
        plan += [(s, m, r, True) for s in schemes if s in compiled for m, r in METHODS]
    order = {scheme: i for i, scheme in enumerate(dict.fromkeys(p[0] for p in plan))}
    return sorted(plan, key=lambda p: (order[p[0]], p[3], p[1] != "frozen"))


def measure_row(base, method: str, rank: int, compiled: bool, args) -> dict | None:
    """One row's init, memory and step figures (None when the method fails on this base); compiled: the
    whole model under torch.compile."""
    unwrap = None
    device = base.get_input_embeddings().weight.device
    before = settled_memory(device)
    tokens = common.batch_shape(args.tokens)
    try:
        model, unwrap, init_s, init_warm_s = common.timed_init(base, method, rank)
        added = settled_memory(device) - before
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        mode = "compiled" if compiled else "eager"
        times, peak, _ = common.train_steps(model, base, mode, False, tokens, args.warmup, args.steps)
    except Exception as err:  # a failing row must not lose the others
        print(f"{method} r={rank}: FAILED {type(err).__name__}: {err}"[:1500], flush=True)
        return None
    finally:
        if unwrap is not None:
            unwrap()
    return dict(
        method=method, rank=rank, compiled=compiled, init_s=round(init_s, 3),
        init_warm_s=None if init_warm_s is None else round(init_warm_s, 3), trainable=trainable,
        adapter_added_gib=round(added, 4), step_ms=round(statistics.median(times), 2), peak_gib=round(peak, 2),
        tokens=tokens[0] * tokens[1],
    )  # fmt: skip


def markdown(rows: list[dict]) -> str:
    head = "| base | method | rank | compiled | init s (warm) | trainable | adapter adds GiB | step ms | × frozen | peak GiB | × frozen |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        warm = "" if r["init_warm_s"] is None else f" ({r['init_warm_s']:.2f})"
        lines.append(
            f"| {r['scheme']} | {r['method']} | {r['rank']} | {'yes' if r['compiled'] else 'no'} | {r['init_s']:.2f}{warm} | {r['trainable']:,} | "
            f"{r['adapter_added_gib']:.3f} | {r['step_ms']:.1f} | {r['ratio_vs_frozen'] or float('nan'):.2f} | "
            f"{r['peak_gib']:.2f} | {r['peak_ratio_vs_frozen'] or float('nan'):.3f} |"
        )
    return "\n".join(lines) + f"\n\nDevice: {', '.join(sorted({r['device'] for r in rows}))}.\n"


if __name__ == "__main__":
    main()
