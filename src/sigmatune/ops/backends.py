"""The fast paths of the transform, registered with core/backends.py when this module is imported (the
model package imports it). The order they are tried in, most specific first:

    transform   the fused Triton kernel, one launch a direction (CUDA, r ≤ 128, a band of w ≤ 16);
                under torch.compile the torch.library op of library.py, one node inductor launches itself;
                per-row coefficients (adapters trained together) for a diagonal, eager
    band        the GEMMs, their band mixes and reductions as Triton kernels (CUDA, w ≤ 16: wide bands,
                and the full spectrum's dg)
    torch       core's GEMMs and torch ops (every call)

Each is checked against core's torch backend and the fp64 reference (tests/core/test_backends.py), and each
can be turned off by name (switches.py). The serving kernels (mixed batches, folds, decode attention) are
serving/ops/'s.
"""

from __future__ import annotations

from ..core.backends import Backend, Call, register, using

__all__ = [
    "FusedTransform",
    "TritonGemms",
    "using",
]  # using(name): one backend for a block (tests, benchmarks)
from ..core.transform import SMALL_RANK, Gemms
from . import band_kernel, library, switches, transform_kernel

KERNEL_STRUCTURES = ("diagonal", "band")  # what the kernels take: g, or a band's column-aligned diagonals


class FusedTransform(Backend):
    """Both directions of the transform in one launch each (transform_kernel.py): a diagonal or a band."""

    name = "transform"

    def supports(self, call: Call) -> bool:
        return call.device == "cuda" and self.can_run(call) and switches.enabled(self.name, call.disabled)

    def can_run(self, call: Call) -> bool:
        kind = call.structure == "diagonal" if call.rows else call.structure in KERNEL_STRUCTURES
        traced = call.rows and call.compiling  # no torch.library op takes rows: inductor traces the GEMMs
        return kind and not traced and transform_kernel.serves(call.device, call.dtype, call.rank, call.band)

    def forward_pass(self, a, basis, coefficients, shift, structure, rows=False):
        tokens = len(a) // len(coefficients) if rows else 0  # rows of a per set of coefficients
        kernel = transform_kernel.fused_transform
        out, projection, _ = kernel(a, basis, coefficients, shift, transposed=True, tokens=tokens)
        return out, projection  # P fp32, padded to the kernel's width

    def backward_pass(self, grad, basis, coefficients, saved, structure, rows=False):
        tokens = len(grad) // len(coefficients) if rows else 0
        kernel = transform_kernel.fused_transform
        grad_a, _, grad_c = kernel(grad, basis, coefficients, saved=saved, tokens=tokens)
        return grad_a, grad_c

    def compiled(self, a, basis, coefficients, shift, structure):
        return library.transform_op(a, basis, coefficients, shift, True)[0]


class TritonGemms(Gemms):
    """core's GEMMs, with a band's mixes and reductions (and a wide diagonal's dg, also per block of rows) as
    Triton kernels: one pass over the projection each, summed in fp32 (band_kernel.py)."""

    name = "band"

    def supports(self, call: Call) -> bool:
        return call.device == "cuda" and self.can_run(call) and switches.enabled(self.name, call.disabled)

    def can_run(self, call: Call) -> bool:
        here = call.device == "cuda" or transform_kernel.INTERPRET
        kind = call.structure == "diagonal" if call.rows else call.structure in KERNEL_STRUCTURES
        kind = kind and call.band <= transform_kernel.MAX_BAND  # rows: a wide diagonal's per-row dg
        return transform_kernel.triton is not None and here and kind

    def mix(self, structure, p, coefficients, transposed: bool):
        return band_kernel.mix(p, coefficients, transposed=transposed)  # a band (a diagonal folds into B)

    def grad(self, structure, q, p, coefficients):
        if structure.elementwise:
            return (
                super().grad(structure, q, p, coefficients)
                if q.shape[1] <= SMALL_RANK
                else band_kernel.grad(q, p, 0)[0]
            )
        return band_kernel.grad(q, p, structure.width(coefficients))

    def rows_grad(self, structure, q, p, coefficients):
        _, tokens, r = q.shape  # a diagonal's (rows: can_run)
        if tokens % band_kernel.BLOCK_N or r <= SMALL_RANK:
            return super().rows_grad(structure, q, p, coefficients)
        return band_kernel.grad(q.view(-1, r), p.view(-1, r), 0, tokens)[:, 0]


register(TritonGemms())
register(FusedTransform())  # tried first
