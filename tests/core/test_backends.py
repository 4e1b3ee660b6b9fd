"""The contract of the one op: every registered backend × structure × update rule × side × dtype computes
the adapted layer as the two-sided fp64 reference does, W' = W (I + V_S M V_Sᵀ) (or (I + U_S M U_Sᵀ) W),
values and gradients (of the input and of the trained tensor). On CPU the Triton backends run in Triton's
interpreter (backends.using makes them); on a GPU machine the compiled kernels. A backend that cannot run a
call (a structure or dtype its kernels do not take) says so, and the case is skipped by its own answer."""

from __future__ import annotations

import pytest
import torch

from sigmatune import SigmaConfig
from sigmatune.core import transform as F
from sigmatune.core.backends import BACKENDS, Call
from sigmatune.core.structures.registry import STRUCTURES, structure_of
from sigmatune.core.updates import update_rule
from sigmatune.ops.backends import using
from tests.core.test_layer import SHAPES, make_linear, wrap
from tests.reference import reference_band_weight, reference_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-4, torch.bfloat16: 4e-2}
KINDS = {"diagonal": 0, "band": 1, "dense": 0}  # a structure, and its band's half-width


def adapted_layer(side, structure, update, dtype):
    """A SpectralLinear on DEVICE in dtype, r = 5, one adapter of the structure with random coefficients."""
    linear = make_linear(SHAPES[side], bias=True, dtype=torch.float64, seed=1)
    layer = wrap(linear, SigmaConfig(rank=5, svd="exact"))
    layer.delete_adapter("default")
    kind = structure_of(structure, KINDS[structure])
    layer.add_adapter("default", list(layer.stored_indices), update, structure=kind)
    layer.set_adapter("default")
    with torch.no_grad():
        vector = layer.sigma_adapters["default"].vector
        vector.copy_(
            kind.initial(torch.randn(vector.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
        )
    layer.base_layer.to(DEVICE, dtype)
    layer.sigma_basis = layer.sigma_basis.to(DEVICE, dtype)
    layer.sigma_values = layer.sigma_values.to(DEVICE)
    layer.sigma_adapters.to(DEVICE)
    return linear, layer


def reference(linear, layer, vector, side):
    """W' in fp64 from a fresh SVD, for the adapter's vector (differentiably)."""
    adapter = layer.sigma_adapters["default"]
    indices, weight = list(layer.stored_indices), linear.weight.detach()
    if adapter.structure.elementwise:
        return reference_weight(weight, indices, vector, adapter.rule.name)
    sigma = layer.sigma_values.cpu().double()
    matrix = adapter.structure.to_dense(update_rule(adapter.rule.name).scales(vector, sigma))
    return reference_band_weight(weight, indices, matrix, side)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", SHAPES)
@pytest.mark.parametrize("update", ["multiplicative", "additive"])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_every_backend_computes_the_reference(backend, structure, update, side, dtype):
    if update == "additive" and structure != "diagonal":
        pytest.skip("a matrix M is read multiplicatively only")
    linear, layer = adapted_layer(side, structure, update, dtype)
    vector = layer.sigma_adapters["default"].vector
    call = Call.of(torch.empty(1, layer.in_features, device=DEVICE, dtype=dtype), layer.sigma_basis,
                   layer.scales("default"), vector_structure(layer))  # fmt: skip
    if not next(b for b in BACKENDS if b.name == backend).can_run(call):
        pytest.skip(f"{backend} cannot run {structure} in {dtype} here")
    x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    upstream = torch.randn(
        3, 7, layer.out_features, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    inputs = x.to(DEVICE, dtype).clone().requires_grad_(True)
    with using(backend):
        out = layer(inputs)
        (out.double() * upstream.to(DEVICE)).sum().backward()
    x64 = x.clone().requires_grad_(True)
    vector64 = vector.detach().cpu().double().requires_grad_(True)
    expected = x64 @ reference(linear, layer, vector64, side).T + linear.bias.detach().cpu().double()
    (expected * upstream).sum().backward()
    tol = TOLERANCE[dtype]
    assert relative(out, expected.detach()) < tol
    assert relative(inputs.grad, x64.grad) < tol
    assert relative(vector.grad, vector64.grad) < 5 * tol


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖, got on any device and in any dtype, want fp64 on the CPU."""
    return float((got.detach().cpu().double() - want).norm() / want.norm())


def vector_structure(layer):
    return layer.sigma_adapters["default"].structure


def test_every_structure_has_a_backend_that_runs_it_and_the_torch_one_runs_everything():
    for structure in STRUCTURES:
        kind = structure_of(structure, KINDS[structure])
        coefficients = torch.zeros(kind.shape(5))
        call = Call.of(torch.empty(1, 8), torch.empty(8, 5), coefficients, kind)
        assert BACKENDS[-1].name == "torch" and BACKENDS[-1].can_run(call)


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_the_plain_call_is_the_call_outside_autocast_and_compile(structure):
    """core/linear.py makes Call.of(..., plain=True) (it has checked there is no autocast and no trace): the
    same Call as without plain, so both find one cached choice; under autocast Call.of takes autocast's dtype."""
    kind = structure_of(structure, KINDS[structure])
    a, basis = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    coefficients = kind.initial(torch.zeros(kind.shape(3)))
    eager = Call.of(a, basis, coefficients, kind, frozenset({"band"}), plain=True)
    assert eager == Call.of(a, basis, coefficients, kind, frozenset({"band"}))
    assert eager == Call(
        "cpu", torch.float64, 3, structure, kind.width(coefficients), False, frozenset({"band"})
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Call.of(a.float(), basis, coefficients, kind).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "tokens", [16, 5]
)  # a multiple of the kernel's rows per program (interpreted), and not
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_every_backend_computes_rows_as_each_block_alone(backend, structure, shifted, tokens, dtype):
    """transform_rows (adapters trained together): leading row b with its own coefficients C[b] is transform()
    of that row with C[b] alone, by the fp64 torch reference — values, and the gradients of the input and of
    every C[b], each from its own rows only."""
    kind = structure_of(structure, KINDS[structure])
    r, d, blocks = 5, 12, 3
    generator = torch.Generator().manual_seed(7)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    basis = torch.linalg.qr(draw(d, r))[0]
    coefficients = torch.stack([kind.initial(draw(*kind.shape(r)) * 0.3) for _ in range(blocks)])
    a, upstream = draw(blocks, tokens, d), draw(blocks, tokens, d)
    shift = draw(r) if shifted else None
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    call = Call.of(a[0].to(DEVICE, dtype), basis.to(DEVICE, dtype), coefficients[0], kind, rows=True)
    if not next(b for b in BACKENDS if b.name == backend).can_run(call):
        pytest.skip(f"{backend} cannot run {structure} rows in {dtype} here")
    inputs = a.to(DEVICE, dtype).clone().requires_grad_(True)
    rows = coefficients.to(DEVICE, wide).clone().requires_grad_(True)
    with using(backend):
        on = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
        out = F.transform_rows(inputs, basis.to(DEVICE, dtype), rows, on(shift), kind)
        (out.double() * upstream.to(DEVICE)).sum().backward()
    a64, c64 = a.clone().requires_grad_(True), coefficients.clone().requires_grad_(True)
    with using("torch"):
        expected = torch.stack(
            [F.transform(a64[b], basis, c64[b], shift, structure=kind) for b in range(blocks)]
        )
    (expected * upstream).sum().backward()
    tol = TOLERANCE[dtype]
    assert relative(out, expected.detach()) < tol
    assert relative(inputs.grad, a64.grad) < tol
    assert relative(rows.grad, c64.grad) < 5 * tol
    for b in range(blocks):  # each block's coefficients from its own rows: not the others' gradient
        assert relative(rows.grad[b], c64.grad[b]) < 5 * tol


def test_rows_of_an_empty_batch_are_a_new_empty_tensor():
    a, basis = torch.randn(0, 4, 8), torch.linalg.qr(torch.randn(8, 2))[0]
    out = F.transform_rows(a, basis, torch.zeros(0, 2))
    assert out.shape == a.shape and out is not a  # not the input itself (an autograd alias)


def test_rows_refuse_a_batch_whose_rows_do_not_match_the_coefficients():
    a, basis = torch.randn(3, 4, 8), torch.linalg.qr(torch.randn(8, 2))[0]
    with pytest.raises(ValueError, match="3 leading rows of the input but coefficients for 2"):
        F.transform_rows(a, basis, torch.zeros(2, 2))
