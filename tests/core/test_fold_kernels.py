"""expand_rows (the expansion after a folded GEMM) against its fp64 definition: Triton's interpreter on CPU,
the GPU in expand_shape's own decode shapes on CUDA; bad calls are refused; ptxas spills (almost) nothing in
those shapes for sm_90."""

from __future__ import annotations

import pytest
import torch

from sigmatune.core import fold_kernels, kernels
from tests.core.spills import spills

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton")


def case(rows, tokens, e, d, ranks, dtype, device, capacity=5, seed=0):
    """Random (h, x, expansions, tables, ids) for a group whose first layer has e output columns."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    x = rand(rows, tokens, d)
    h = torch.cat([rand(rows, tokens, e)] + [rand(rows, tokens, r) for r in ranks], dim=-1)
    expansions = [rand(e, ranks[0])] + [rand(d, r) for r in ranks[1:]]
    tables = [torch.randn(capacity, r, generator=generator).to(device) * 0.5 for r in ranks]
    ids = torch.randint(0, capacity, (rows,), generator=generator).to(device)
    return h, x, expansions, tables, ids


def expected(h, x, expansions, tables, ids) -> list[torch.Tensor]:
    """out_0 = h[…, :e] + ((x Q_0) ⊙ T_0[ids]) P_0ᵀ, out_m = x + ((x Q_m) ⊙ T_m[ids]) P_mᵀ, in fp64."""
    e = expansions[0].shape[0]
    start, outs = e, []
    for m, (p, table) in enumerate(zip(expansions, tables, strict=True)):
        r = p.shape[1]
        projection = h[..., start : start + r].double()
        start += r
        base = h[..., :e] if m == 0 else x
        g = table.double()[ids][:, None, :]  # (B, 1, r): every token of a row on its adapter
        outs.append(base.double() + (projection * g) @ p.double().T)
    return outs


@pytest.mark.parametrize(
    "ranks, dtype",
    [
        ([8, 20, 5], torch.float32),
        ([16], torch.float32),
        ([32, 16], torch.bfloat16),
        ([40, 40, 40], torch.float32),
    ],
    ids=["three-uneven", "alone", "bf16-two", "three-over-a-step"],
)
def test_expand_rows_equals_its_definition_in_the_interpreter(ranks, dtype):
    if not kernels.INTERPRET:
        pytest.skip("the interpreter's run (CUDA runs its own test)")
    inputs = case(rows=3, tokens=2, e=24, d=40, ranks=ranks, dtype=dtype, device="cpu")
    outs = fold_kernels.expand_rows(*inputs)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    for out, reference in zip(outs, expected(*inputs), strict=True):
        assert out.dtype == dtype and out.shape == reference.shape
        torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 64, 1024])
@pytest.mark.parametrize("rank", [16, 128])
def test_expand_rows_in_its_decode_shapes_on_cuda(rows, rank):
    """The 1.1B Llama's widest group (gate, up: 5,632 columns after a 2,048-wide input), bf16."""
    inputs = case(rows, 1, e=5632, d=2048, ranks=[rank, rank], dtype=torch.bfloat16, device="cuda")
    outs = fold_kernels.expand_rows(*inputs)
    for out, reference in zip(outs, expected(*inputs), strict=True):
        update = (reference - inputs[0][..., : out.shape[-1]].double()).abs().max()
        assert update > 1  # (the expansion adds something that a wrong kernel would miss)
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


def test_expand_shapes_keep_their_tiles_in_registers():
    """expand_rows as expand_shape launches it for decode steps and prefill of the 1.1B Llama, compiled for
    sm_90 in a process without the interpreter: ptxas spills at most 64 bytes a thread (the 64 × 128 tile at
    r128 spills 16–36, and measured fastest on the H200; 4 warps there spilled over 1 KB)."""
    cases = [
        ["fold", n, rank, members] for n in (16, 64, 1024, 8192) for rank in (16, 128) for members in (1, 3)
    ]
    for given, (shape, spilled, report) in zip(cases, spills(cases), strict=True):
        assert spilled <= 64, (given, shape, report)
