"""The fused transform as custom ops (ops/library.py): torch.library's own checks of the ops, their
values and gradients against the fp64 reference, and torch.compile seeing one node per direction.

On CPU the ops run the kernel in Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a GPU
machine the compiled kernel, and inductor compiles a model around them.
"""

from __future__ import annotations

import pytest
import torch

from sigmatune import SigmaConfig, get_sigma_model
from sigmatune.core import transform as F
from sigmatune.core.structures.band import valid_part
from sigmatune.ops import library as transform_op
from sigmatune.ops import transform_kernel as kernels
from sigmatune.ops.backends import using
from tests.ops.test_transform_kernel import band_case, case, reference
from tests.training.test_trainer import tiny_llama, token_batch

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("band", [0, 2])
@pytest.mark.parametrize("with_shift", [False, True])
def test_the_ops_pass_torch_librarys_checks(band, with_shift):
    """opcheck: the fake implementations' shapes, the registered autograd, no aliasing, schema."""
    a, basis, g, shift = case(21, 40, 6, torch.float32, seed=2)
    if band:
        g = valid_part(band_case(21, 40, 6, band, torch.float32, seed=2)[2])
    a.requires_grad_(True)
    g.requires_grad_(True)
    torch.library.opcheck(transform_op.transform_op, (a, basis, g, shift if with_shift else None, True))
    projection = torch.randn(21, kernels.padded_rank(6), device=DEVICE)
    torch.library.opcheck(transform_op.transform_backward_op, (a.detach(), basis, g.detach(), projection))


def test_the_op_and_its_gradients_match_the_fp64_reference():
    a, basis, g, shift = case(37, 48, 5, torch.float32, seed=4)
    x, w = a.clone().requires_grad_(True), g.clone().requires_grad_(True)
    out, projection = transform_op.transform_op(x, basis, w, shift, True)
    weights = torch.linspace(-1, 1, 48, device=DEVICE)
    (out * weights).square().sum().backward()
    x64, w64 = a.double().requires_grad_(True), g.double().requires_grad_(True)
    expected, expected_projection = reference(x64, basis, w64, shift)
    (expected * weights.double()).square().sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(projection[:, :5].double(), expected_projection.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-3)


def compiled_ops(model, ids) -> tuple[list[str], torch.Tensor]:
    """The ops of the graph torch.compile traces for the model's loss (a backend that records them), and
    the loss it computes."""
    seen = []

    def recording(graph, inputs):
        seen.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    with using("transform"):  # on CPU the interpreter runs the kernel: no backend chooses it there itself
        loss = torch.compile(model, fullgraph=True, backend=recording)(ids, labels=ids).loss
    return seen, loss


def test_torch_compile_sees_one_op_per_adapted_layer_and_matches_eager():
    model = get_sigma_model(tiny_llama().to(DEVICE), SigmaConfig(rank=4, init="normal", init_std=0.1))
    ids = token_batch().to(DEVICE)
    eager = model(ids, labels=ids).loss
    layers = sum(
        1 for name, _ in model.named_modules() if name.endswith("_proj") and "base_layer" not in name
    )
    seen, loss = compiled_ops(model, ids)
    assert sum("sigmatune.transform" in op for op in seen) == layers, seen
    assert not any("triton_kernel_wrapper" in op for op in seen)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)


def test_compiled_training_through_the_op_matches_eager_gradients(monkeypatch):
    """aot_eager: the backward graph takes the registered autograd formula (the backward op)."""
    model = get_sigma_model(tiny_llama().to(DEVICE), SigmaConfig(rank=4, init="normal", init_std=0.1))
    ids = token_batch().to(DEVICE)
    with using("transform"):
        model(ids, labels=ids).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    calls = []
    original = kernels.fused_transform
    monkeypatch.setattr(
        kernels, "fused_transform", lambda *a, **k: calls.append(k.get("saved") is None) or original(*a, **k)
    )
    with using("transform"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(ids, labels=ids).loss.backward()
    forward, backward = calls.count(True), calls.count(False)
    if transform_op.TRACEABLE:  # a Triton op's body runs once per layer in each trace of the graph
        assert forward % len(eager) == backward % len(eager) == 0 and backward > 0
    else:  # an opaque op runs once per layer and direction
        assert forward == backward == len(eager) > 0
    for name, grad in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_the_compiled_path_keeps_the_eager_functions_result_under_autocast():
    """Under autocast the op computes and returns autocast's dtype, as _Transform does; a's gradient comes
    back in a's dtype."""
    a, basis, g, _ = case(24, 32, 4, torch.float32, seed=5)
    results = []
    for run in (F.transform, torch.compile(F.transform, fullgraph=True, backend="aot_eager")):
        x = a.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16), using("transform"):
            out = run(x, basis, g)
        out.float().square().sum().backward()
        results.append((out, x.grad))
    (eager, eager_grad), (compiled, compiled_grad) = results
    assert compiled.dtype == eager.dtype == torch.bfloat16 and compiled_grad.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0)
