"""The mixed-batch kernel of serving (serving/ops/rows_kernel.py) against the plain reference: each row's
scales gathered by id, for up to three layers of one input per launch, in every launch shape; and the
launch shapes a decode step takes keep their tiles in registers.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest).
"""

from __future__ import annotations

import pytest
import torch

from sigmatune.ops import transform_kernel as kernels
from sigmatune.serving.ops import rows_kernel as rows_kernels
from tests.ops.spills import spills
from tests.ops.test_transform_kernel import DEVICE, TOLERANCE, case

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, ranks", [((5, 70), [3]), ((3, 7, 40), [16, 5]), ((2, 1, 96), [20, 16, 8]), ((33, 64), [16, 16])]
)
@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize(
    "split, shared", [(None, None), (1, False), (3, False), (2, True), (3, True), (99, True)]
)
def test_mixed_batch_kernel_gathers_each_rows_g_for_every_layer_of_the_launch(
    dtype, shape, ranks, with_shift, split, shared
):
    """out_m = a + ((a B_m − c_m) ⊙ T_m[ids[b]]) B_mᵀ for every member, each leading row b on its table row,
    whatever the split of the columns (a split past the column blocks there are is clamped), each column
    block projecting alone or (on CUDA) sharing the projection through a barrier (over one step of columns
    or more)."""
    g_ = torch.Generator().manual_seed(3)
    a = torch.randn(*shape, generator=g_).to(DEVICE, dtype)
    d = shape[-1]
    bases = [
        torch.linalg.qr(torch.randn(d, r, generator=g_, dtype=torch.float64)).Q.to(DEVICE, dtype)
        for r in ranks
    ]
    tables = [(torch.randn(7, r, generator=g_) * 0.5).to(DEVICE) for r in ranks]
    ids = torch.randint(0, 7, (shape[0],), generator=g_).to(DEVICE)
    shifts = [torch.randn(r, generator=g_).to(DEVICE) for r in ranks] if with_shift else None
    launch = None if split is None else (16, split, 32, 4, shared)  # rows, column blocks, step, warps, shared
    outs = rows_kernels.fused_transform_rows(a, bases, tables, ids, shifts, shape=launch)
    assert len(outs) == len(ranks)
    for m, out in enumerate(outs):
        projection = a.double() @ bases[m].double() - (0 if shifts is None else shifts[m].double())
        rows = tables[m].double()[ids].view(shape[0], *([1] * (a.dim() - 2)), ranks[m])
        expected = a.double() + (projection * rows) @ bases[m].double().T
        tol = TOLERANCE[dtype] * 4
        assert out.dtype == dtype and out.shape == a.shape
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_mixed_batch_kernel_refuses_what_it_cannot_serve():
    a, basis, _, _ = case(4, 16, 4, torch.float32)
    table = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 3 layers"):
        rows_kernels.fused_transform_rows(
            a, [basis] * 4, [table] * 4, torch.zeros(4, dtype=torch.long, device=DEVICE)
        )
    with pytest.raises(ValueError, match="3 adapter rows for a batch of 4"):
        rows_kernels.fused_transform_rows(
            a, [basis], [table], torch.zeros(3, dtype=torch.long, device=DEVICE)
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (launch_shape's GPU shapes)")
@pytest.mark.parametrize(("n", "rank"), [(256, 16), (256, 128), (1024, 16), (1024, 128), (64, 128)])
def test_mixed_batch_kernel_in_its_default_shapes_on_cuda(n, rank):
    """The shapes launch_shape picks for decode batches (8 warps and 64-column steps from 64 rows on,
    shared projections at r16) give the fp64 result for the 1.1B Llama's width."""
    g_ = torch.Generator(device="cuda").manual_seed(n + rank)
    d = 2048
    a = torch.randn(n, d, device="cuda", generator=g_, dtype=torch.bfloat16)
    bases = [
        torch.linalg.qr(torch.randn(d, rank, device="cuda", generator=g_)).Q.bfloat16() for _ in range(3)
    ]
    tables = [torch.randn(n, rank, device="cuda", generator=g_) * 0.5 for _ in range(3)]
    ids = torch.randperm(n, device="cuda", generator=g_)
    outs = rows_kernels.fused_transform_rows(a, bases, tables, ids)
    for m, out in enumerate(outs):
        rows = tables[m].double()[ids]
        expected = a.double() + ((a.double() @ bases[m].double()) * rows) @ bases[m].double().T
        torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graphs; the barrier runs only there)")
def test_mixed_batch_kernel_sharing_its_projection_replays_in_a_cuda_graph():
    """The shared projection's barrier (counters that only grow) gives the same result replay after replay
    of a graph holding launches of two grids, with new inputs and table rows each time."""
    g_ = torch.Generator(device="cuda").manual_seed(8)
    d, r, n = 512, 16, 48
    a = torch.randn(n, d, device="cuda", generator=g_, dtype=torch.bfloat16)
    bases = [torch.linalg.qr(torch.randn(d, r, device="cuda", generator=g_)).Q.bfloat16() for _ in range(3)]
    tables = [torch.randn(5, r, device="cuda", generator=g_) * 0.5 for _ in range(3)]
    ids = torch.randint(0, 5, (n,), device="cuda", generator=g_)
    shapes = [(16, 4, 128, 4, True), (16, 2, 128, 4, True)]  # one step a block; two steps a block

    def launches():
        return [
            rows_kernels.fused_transform_rows(a, bases[: 1 + i], tables[: 1 + i], ids, shape=s)
            for i, s in enumerate(shapes)
        ]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launches()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = launches()
    for replay in range(5):
        a.copy_(torch.randn(n, d, device="cuda", generator=g_))
        tables[1][replay % 5].normal_(generator=g_)
        graph.replay()
        for outs in captured:
            for m, out in enumerate(outs):
                rows = tables[m].double()[ids]
                expected = a.double() + ((a.double() @ bases[m].double()) * rows) @ bases[m].double().T
                torch.testing.assert_close(out.double(), expected, rtol=0.1, atol=0.1)


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (and its ptxas)")
def test_a_decode_steps_launch_shapes_keep_their_tiles_in_registers():
    """The mixed-batch kernel as launch_shape launches it for decode steps of the 1.1B Llama on an H200
    (132 multiprocessors), compiled here by Triton for sm_90 (in a process without the interpreter):
    ptxas spills no register (at 4 warps, 64-row blocks spilled 1.3–3.6 KB a thread)."""
    cases = [
        (64, 16, 3),
        (64, 128, 3),
        (256, 32, 2),
        (1024, 16, 3),
        (1024, 128, 3),
        (1024, 128, 1),
    ]  # rows, rank, layers
    for launch, (shape, spilled, report) in zip(cases, spills(cases), strict=True):
        assert spilled == 0, (launch, shape, report)
