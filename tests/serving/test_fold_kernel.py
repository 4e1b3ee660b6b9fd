"""expand_rows (the expansion after a folded GEMM) against its fp64 definition: Triton's interpreter on CPU,
the GPU in expand_shape's own decode shapes on CUDA; bad calls are refused; ptxas spills (almost) nothing in
those shapes for sm_90."""

from __future__ import annotations

import pytest
import torch

from sigmatune.ops import transform_kernel as kernels
from sigmatune.serving.ops import fold_kernel as fold_kernels
from tests.ops.spills import spills

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton")


def case(rows, tokens, e, d, ranks, dtype, device, capacity=5, seed=0, outputs=1):
    """Random (h, x, expansions, tables, ids) for a group whose first `outputs` layers have their outputs
    in h: e columns for the first, e // 2 for the next (as k and v after q); the others expand x."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    widths = ([e] + [e // 2] * (outputs - 1))[:outputs] + [d] * (len(ranks) - outputs)
    x = rand(rows, tokens, d)
    h = torch.cat(
        [rand(rows, tokens, w) for w in widths[:outputs]] + [rand(rows, tokens, r) for r in ranks], -1
    )
    expansions = [rand(w, r) for w, r in zip(widths, ranks, strict=True)]
    tables = [torch.randn(capacity, r, generator=generator).to(device) * 0.5 for r in ranks]
    ids = torch.randint(0, capacity, (rows,), generator=generator).to(device)
    return h, x, expansions, tables, ids


def expected(h, x, expansions, tables, ids, outputs=1) -> list[torch.Tensor]:
    """out_m = y_m + ((x Q_m) ⊙ T_m[ids]) P_mᵀ for m < outputs (y_m: h's columns of layer m), else
    x + ((x Q_m) ⊙ T_m[ids]) P_mᵀ, in fp64."""
    start, outs, bases = sum(p.shape[0] for p in expansions[:outputs]), [], []
    for p in expansions[:outputs]:
        bases.append(h[..., sum(b.shape[-1] for b in bases) :][..., : p.shape[0]])
    bases += [x] * (len(expansions) - outputs)
    for base, p, table in zip(bases, expansions, tables, strict=True):
        r = p.shape[1]
        projection = h[..., start : start + r].double()
        start += r
        g = table.double()[ids][:, None, :]  # (B, 1, r): every token of a row on its adapter
        outs.append(base.double() + (projection * g) @ p.double().T)
    return outs


@pytest.mark.parametrize(
    "ranks, dtype, outputs",
    [
        ([8, 20, 5], torch.float32, 1),
        ([16], torch.float32, 1),
        ([32, 16], torch.bfloat16, 1),
        ([40, 40, 40], torch.float32, 1),
        ([8, 20, 5], torch.float32, 3),
        ([16, 24, 8], torch.float32, 2),
        ([32, 16], torch.bfloat16, 2),
        ([8, 20], torch.float32, 0),
        ([16, 16, 16], torch.bfloat16, 0),
    ],
    ids=[
        "three-uneven",
        "alone",
        "bf16-two",
        "three-over-a-step",
        "three-outputs",
        "two-outputs",
        "bf16-outputs",
        "inputs",
        "bf16-inputs",
    ],
)
@pytest.mark.parametrize(
    "shape",
    [None, (16, 16, 2, 4, 2, 1), (16, 16, 3, 4, 1, 1), (16, 32, 1, 4, 1, 1)],
    ids=["", "early", "early3", "early1"],
)
def test_expand_rows_equals_its_definition_in_the_interpreter(ranks, dtype, outputs, shape):
    """In expand_shape's interpreter shape and with the base tiles loaded ahead (EARLY), over 1–3 blocks a
    program (d = 40: the last program's blocks partly or wholly past the columns); members adding to x or,
    the first `outputs`, to their own output columns in h."""
    if not kernels.INTERPRET:
        pytest.skip("the interpreter's run (CUDA runs its own test)")
    inputs = case(rows=3, tokens=2, e=24, d=40, ranks=ranks, dtype=dtype, device="cpu", outputs=outputs)
    outs = fold_kernels.expand_rows(*inputs, outputs=outputs, shape=shape)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    for out, reference in zip(outs, expected(*inputs, outputs=outputs), strict=True):
        assert out.dtype == dtype and out.shape == reference.shape
        torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 64, 1024])
@pytest.mark.parametrize("rank", [16, 128])
@pytest.mark.parametrize("group", ["gate-up", "qkv", "inputs"])
def test_expand_rows_in_its_decode_shapes_on_cuda(rows, rank, group):
    """The 1.1B Llama's widest group (gate, up: 5,632 columns after a 2,048-wide input), q k v as three
    outputs (2,048, 1,024, 1,024 columns) and two transformed inputs (gate's and up's, 2,048), bf16."""
    e, members, outputs = {"gate-up": (5632, 2, 1), "qkv": (2048, 3, 3), "inputs": (2048, 2, 0)}[group]
    inputs = case(rows, 1, e, 2048, [rank] * members, torch.bfloat16, "cuda", outputs=outputs)
    outs = fold_kernels.expand_rows(*inputs, outputs=outputs)
    h, x, expansions, tables, ids = inputs
    bases = expected(h, x, expansions, [t * 0 for t in tables], ids, outputs=outputs)
    for out, reference, base in zip(outs, expected(*inputs, outputs=outputs), bases, strict=True):
        assert (reference - base).abs().max() > 1  # (the expansion adds something a wrong kernel would miss)
        torch.testing.assert_close(out.double(), reference, rtol=0.02, atol=0.15)


def test_bad_calls_are_refused():
    h, x, expansions, tables, ids = case(
        rows=2, tokens=1, e=8, d=16, ranks=[4, 4], dtype=torch.float32, device="cpu"
    )
    with pytest.raises(ValueError, match="1 to 3 layers"):
        fold_kernels.expand_rows(h, x, expansions * 2, tables * 2, ids)
    with pytest.raises(ValueError, match="3 adapter rows"):
        fold_kernels.expand_rows(h, x, expansions, tables, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="expansions"):
        fold_kernels.expand_rows(h, x, [expansions[0], expansions[0]], tables, ids)
    with pytest.raises(ValueError, match="3 outputs"):
        fold_kernels.expand_rows(h, x, expansions, tables, ids, outputs=3)
    with pytest.raises(ValueError, match=r"\(2 outputs\)"):  # h holds one layer's output, not two
        fold_kernels.expand_rows(h, x, expansions, tables, ids, outputs=2)


def test_expand_shapes_keep_their_tiles_in_registers():
    """expand_rows as expand_shape launches it for decode steps and prefill of the 1.1B Llama, compiled for
    sm_90 in a process without the interpreter: ptxas spills at most 80 bytes a thread (the 64 × 128 tile at
    r128 spills 16–68, and measured fastest on the H200; 4 warps there spilled over 1 KB)."""
    cases = [
        ["fold", n, rank, members, outputs]
        for n in (16, 64, 1024, 8192)
        for rank in (16, 128)
        for members, outputs in ((1, 1), (3, 1), (3, 3), (2, 0))
    ]
    for given, (shape, spilled, report) in zip(cases, spills(cases), strict=True):
        assert spilled <= 80, (given, shape, report)
