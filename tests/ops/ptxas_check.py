"""Compile the mixed-batch kernels as they are launched, for an H200 (sm_90, 132 multiprocessors), and
print ptxas's -v report per case, as JSON: [[shape, report], …]. Needs no GPU; run without
TRITON_INTERPRET (spills.py does, in a child process).

    python -m tests.ops.ptxas_check '[[64, 16, 3], [1024, 128, 1]]'     # [rows, padded rank, layers], …
    python -m tests.ops.ptxas_check '[["fold", 64, 16, 3, 1]]'          # expand_rows, launched by expand_shape
    python -m tests.ops.ptxas_check '[["transform", 64, 1, 0]]'        # the training transform: width, reduce, band
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from sigmatune.ops import transform_kernel as kernels
from sigmatune.serving.ops import fold_kernel as fold_kernels
from sigmatune.serving.ops import rows_kernel as rows_kernels

PROCESSORS, D = 132, 2048  # an H200; the 1.1B Llama's hidden size


def report(n: int, width: int, members: int) -> tuple[tuple, str]:
    shape = rows_kernels.launch_shape(n, D, members, width, processors=PROCESSORS)
    _, _, meta = rows_kernels.rows_plan(n, D, members, width, shape, processors=PROCESSORS)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    constants = {**meta, "HAS_SHIFT": False, "PRECISION": "tf32", "UPCAST": False}
    pointers = {"A": "*bf16", "IDS": "*i64", "PARTIAL": "*fp32", "COUNTS": "*i64"}
    for m in range(3):
        pointers.update({f"B{m}": "*bf16", f"T{m}": "*fp32", f"C{m}": "*fp32", f"O{m}": "*bf16"})
    return shape, compiled(rows_kernels._rows_kernel, pointers, constants, warps, stages)


def report_fold(n: int, width: int, members: int, outputs: int = 1) -> tuple[tuple, str]:
    """expand_rows over n rows of the 1.1B Llama's widest group output (gate: 5,632 columns), its first
    `outputs` members adding to their outputs in h."""
    shape = fold_kernels.expand_shape(n, 5632, width)
    block_n, block_c, loop, warps, stages, early = fold_kernels.complete_shape(shape)
    constants = dict(
        MEMBERS=members, OUTPUTS=outputs, PRECISION="tf32", UPCAST=False, BLOCK_N=block_n, BLOCK_C=block_c
    )
    constants.update(BLOCK_R=width, LOOP=loop, EARLY=bool(early))
    pointers = {"H": "*bf16", "X": "*bf16", "IDS": "*i64"}
    for m in range(3):
        pointers.update({f"P{m}": "*bf16", f"T{m}": "*fp32", f"O{m}": "*bf16"})
    return shape, compiled(fold_kernels._expand_kernel, pointers, constants, warps, stages)


def report_transform(width: int, reduce: int, band: int, rows: int = 0) -> tuple[tuple, str]:
    """transform_kernel.fused_transform's kernel as launch_shape launches it for a padded rank (bf16 activations), its
    forward pass (reduce 0) or backward pass (reduce 1), a diagonal (band 0) or a band of that half-width; rows 1
    or 2: a diagonal per block of rows (adapters trained together), blocks that tile the programs or any."""
    shape = block_n, warps, columns, stages = kernels.launch_shape(width)
    constants = dict(
        HAS_SHIFT=False, REDUCE=bool(reduce), ROWS=rows, PRECISION="tf32", UPCAST=False, WIDTH=band,
        MIX=0 if band == 0 else 1 + reduce, BLOCK_R=width, BLOCK_N=block_n, BLOCK_D=columns,
    )  # fmt: skip
    pointers = {"A": "*bf16", "B": "*bf16", "G": "*fp32", "C": "*fp32", "OUT": "*bf16"}
    pointers.update(PROJ="*fp32", SAVED="*fp32", PARTIAL="*fp32")
    return shape, compiled(kernels._transform_kernel, pointers, constants, warps, stages)


def compiled(kernel, pointers: dict, constants: dict, warps: int, stages: int) -> str:
    """ptxas's -v report of the kernel compiled for sm_90 (arguments not named: i32)."""
    signature = {
        name: "constexpr" if name in constants else pointers.get(name, "i32") for name in kernel.arg_names
    }
    source = ASTSource(kernel, signature, constants)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages)
    )
    folder = Path(tempfile.mkdtemp())
    (folder / "kernel.ptx").write_text(compiled.asm["ptx"])
    ptxas = get_ptxas(90)
    ptx, cubin = str(folder / "kernel.ptx"), str(folder / "kernel.cubin")
    command = [getattr(ptxas, "path", ptxas), "-v", "--gpu-name", "sm_90a", ptx, "-o", cubin]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return " ".join(done.stderr.split())


if __name__ == "__main__":
    cases = json.loads(sys.argv[1])
    reports = {"fold": report_fold, "transform": report_transform}
    print(json.dumps([reports[c[0]](*c[1:]) if isinstance(c[0], str) else report(*c) for c in cases]))
