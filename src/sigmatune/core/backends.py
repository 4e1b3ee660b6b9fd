"""The method's one op, and the backends that compute it: every fast path is one Backend in BACKENDS.

    transform:  out = a + ((a B − c) Mᵀ) Bᵀ        a (N, d), B (d, r), c (r,) or none, M = diag(g) or a band
    by rows:    the same with one set of coefficients per block of N / n consecutive rows, C (n, *shape)

Semantics of a Backend (checked against core/transform.py's GEMMs and the fp64 reference by
tests/core/test_backends.py, values and gradients):
    forward_pass(a, B, C, c, S) → (out in a's dtype, saved)     C: the coefficients of structure S, fp32
    backward_pass(dout, B, C, saved, S) → (dout + ((dout B) M) Bᵀ, dC in fp32, C's shape)
    rows=True: C (n, *shape), row i of a with C[i // (N / n)] (adapters trained together); dC (n, *shape),
               each block's sum over its own rows only (under torch.compile rows take plain ops, not a backend)
    compiled(a, B, C, c, S) → out, one node for torch.compile, or None to let it trace the passes
    by_ops(call) → whether an eager plain nn.Linear takes four torch ops (core/linear.py) instead of one
                   autograd node around the passes

BACKENDS lists them most specific first; choose(call) takes the first whose supports(call) is true, once
per kind of call (cached; under torch.compile the list is walked as it is traced). core registers the
torch backend (transform.GEMMS, last); ops/ registers the Triton ones when it is imported (sigmatune.model
does). using(name) makes every call take one backend (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

NOTHING_DISABLED: frozenset[str] = frozenset()


class Call(NamedTuple):
    """What a backend needs to know to say whether it serves a call (a tuple: made and hashed on every
    eager layer call, so as cheap as Python allows)."""

    device: str  # "cuda", "cpu", ...
    dtype: torch.dtype  # of a (autocast's, where it is on)
    rank: int  # r, the basis' columns
    structure: str  # the coefficients' structure (core/structures/)
    band: int | None  # its half-width as a band: 0 for a diagonal, None where it is no band
    compiling: bool  # traced by torch.compile
    disabled: frozenset[str] = NOTHING_DISABLED  # kernels the caller turned off (ops/switches.py)
    rows: bool = False  # one set of coefficients per block of rows (the Semantics' rows=True)

    @staticmethod
    def of(
        a: torch.Tensor,
        basis: torch.Tensor,
        coefficients,
        structure,
        disabled=NOTHING_DISABLED,
        plain=False,
        rows=False,
    ) -> Call:
        """The call for a (N, d), its basis (d, r) and coefficients of the structure (one block's, for
        rows). plain: the caller has checked there is neither autocast nor a trace (core/linear.py, the
        eager hot path), so neither is asked again."""
        device = "cuda" if a.is_cuda else a.device.type  # is_cuda: no torch.device made
        dtype, compiling = a.dtype, False
        if not plain:
            if torch.is_autocast_enabled(device):
                dtype = torch.get_autocast_dtype(device)
            compiling = torch.compiler.is_compiling()
        band = structure.width(coefficients)
        return Call(device, dtype, basis.shape[1], structure.name, band, compiling, disabled, rows)


class Backend:
    """One way to compute the op (the Semantics above). Subclasses set name and implement the passes."""

    name = "?"

    def supports(self, call: Call) -> bool:
        raise NotImplementedError

    def can_run(self, call: Call) -> bool:
        """Whether it can compute the call at all, chosen or not (using() asks this): by default, supports."""
        return self.supports(call)

    def forward_pass(self, a, basis, coefficients, shift, structure, rows=False):
        raise NotImplementedError

    def backward_pass(self, grad, basis, coefficients, saved, structure, rows=False):
        raise NotImplementedError

    def compiled(self, a, basis, coefficients, shift, structure):
        return None

    def by_ops(self, call: Call) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


BACKENDS: list[Backend] = []
_chosen: dict[Call, Backend] = {}
_forced: str | None = None  # using(): every call takes this backend


def register(backend: Backend, last: bool = False) -> None:
    """Add a backend (replacing one of the same name): first in the list, or last (the plain torch one)."""
    BACKENDS[:] = [b for b in BACKENDS if b.name != backend.name]
    BACKENDS.insert(len(BACKENDS) if last else 0, backend)
    _chosen.clear()


def choose(call: Call) -> Backend:
    """The backend that computes this call: the first that supports it (or the one using() forces)."""
    if _forced is not None:
        return _force(call)
    if call.compiling:  # traced once per graph: walk the list (the cache is for eager calls)
        return next(b for b in BACKENDS if b.supports(call))
    backend = _chosen.get(call)
    if backend is None:
        backend = _chosen[call] = next(b for b in BACKENDS if b.supports(call))
    return backend


def named(name: str) -> Backend:
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    raise KeyError(f"no backend {name!r}; registered: {[b.name for b in BACKENDS]} (import sigmatune.ops)")


@contextlib.contextmanager
def using(name: str):
    """Within the block every call takes the backend `name` (an error where it cannot run the call)."""
    global _forced
    named(name)
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _force(call: Call) -> Backend:
    backend = named(_forced)
    if not backend.can_run(call):
        raise ValueError(f"backend {_forced!r} cannot run {call}")
    return backend
