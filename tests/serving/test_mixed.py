"""MixedBatch: a served batch through the mixed-batch kernel (Triton's interpreter on CPU, made to serve as
it does on CUDA) equals the torch path; layers reading one input share a launch once learned, with their
projections folded into the first one's GEMM (its weight a view of the folded storage, no copy); a member
called with another tensor computes alone; what the kernel cannot serve takes the torch ops."""

from __future__ import annotations

import pytest
import torch

from sigmatune import AdapterBank, SigmaConfig
from sigmatune.ops import switches
from sigmatune.ops import transform_kernel as kernels
from sigmatune.serving.mixed import SharedInputs, declared_groups
from sigmatune.serving.ops import fold_kernel as fold_kernels
from sigmatune.serving.ops import rows_kernel as rows_kernels
from tests.models import tiny_llama, token_batch

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_bank(config=None, adapters=3, seed=0, **model) -> tuple[AdapterBank, list[str]]:
    """A bank over tiny_llama(**model) (k, v and down are output-side there) with random adapters."""
    bank = AdapterBank.over(tiny_llama(**model).to(DEVICE), config or SigmaConfig(rank=8, svd="exact"))
    generator = torch.Generator().manual_seed(seed)
    names = [f"a{i}" for i in range(adapters)]
    scales = {
        name: torch.randn(adapters, layer.stored_rank, generator=generator) * 0.3
        for name, layer in bank.layers.items()
    }
    bank.add_many(names, scales)
    bank.fold()  # as the serving engine does: projections folded into the base GEMMs
    return bank, names


@pytest.fixture(autouse=True)
def kernel_serves():
    """The kernel serves as on CUDA (on CPU: in Triton's interpreter)."""
    with switches.interpreted():
        yield


TORCH = frozenset({"rows"})  # a bank with these kernels off serves by the torch ops
KERNELS = frozenset()


@pytest.fixture
def launches(monkeypatch):
    """The layer count of each launch of the mixed-batch kernel: n for the unfolded kernel, ("folded", n)
    for the expansion after a folded GEMM."""
    counts = []
    unfolded, expand = rows_kernels.fused_transform_rows, fold_kernels.expand_rows

    def counted(a, bases, *args, **kwargs):
        counts.append(len(bases))
        return unfolded(a, bases, *args, **kwargs)

    def counted_expand(h, x, expansions, *args, **kwargs):
        counts.append(("folded", len(expansions)))
        return expand(h, x, expansions, *args, **kwargs)

    monkeypatch.setattr(rows_kernels, "fused_transform_rows", counted)
    monkeypatch.setattr(fold_kernels, "expand_rows", counted_expand)
    return counts


def served(bank, ids, rows):
    with torch.no_grad():
        return bank(ids, adapter_ids=rows).logits


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "learned"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "biases"])
def test_the_kernel_path_equals_the_torch_path_with_the_layers_that_share_an_input(
    launches, monkeypatch, bias, declared
):
    """Llama's q/k/v and gate/up are declared by their names; for names no declaration matches the groups
    are learned from the first forward (one launch a layer), to the same groups. With biases, the folded
    GEMMs of o (input side) and down (output side) carry them."""
    bank, _ = random_bank(attention_bias=bias, mlp_bias=bias)
    if not declared:
        bank._shared = SharedInputs()  # as for a model whose layer names SHARED_INPUTS does not declare
    rows = ["a0", "base", "a2", "a1", "a0"]
    ids = token_batch(batch=len(rows), length=6).to(DEVICE)
    bank.disabled_kernels = TORCH
    expected = served(bank, ids, rows)  # the torch ops
    assert launches == []
    bank.disabled_kernels = KERNELS
    first = served(bank, ids, rows)
    folds = [("folded", n) for n in [3, 1, 2, 1] * 2]  # q k v | o | gate up | down, per decoder layer
    if declared:
        assert sorted(launches) == sorted(folds)  # folded from the first forward on
    else:
        assert launches == [1] * 14  # the first forward: one launch per layer (7 × 2 layers), learning
    groups = set(bank._shared.groups.values())
    layer = "model.layers.0"
    assert (f"{layer}.self_attn.q_proj", f"{layer}.self_attn.k_proj", f"{layer}.self_attn.v_proj") in groups
    assert (f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj") in groups
    launches.clear()
    gemms = counted_gemms(monkeypatch)
    second = served(bank, ids, rows)
    assert sorted(launches) == sorted(folds)
    # per decoder layer: q's GEMM (k's and v's outputs too), o, gate's projections, gate, up, down; lm_head
    assert len(gemms) == 2 * 6 + 1
    assert fold_outputs(bank) == {"q_proj": 3, "o_proj": 1, "gate_proj": 0, "down_proj": 1}  # gate: 48 of 32
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-4)
    bank.disabled_kernels = frozenset({"fold"})  # the projections in the kernel
    launches.clear()
    unfolded = served(bank, ids, rows)
    assert sorted(launches) == sorted([3, 1, 2, 1] * 2)  # the same groups, projected in the kernel
    torch.testing.assert_close(unfolded, expected, rtol=1e-4, atol=1e-4)


def fold_outputs(bank) -> dict[str, int]:
    """Per group's first layer type, how many of its layers have their weights in its fold."""
    return {fold.members[0].split(".")[-1]: fold.outputs for fold in bank._folds._folds.values()}


def counted_gemms(monkeypatch) -> list[tuple[int, int]]:
    """From now on: the weight shape of every F.linear (nn.Linear's forward and the folded GEMMs)."""
    shapes, linear = [], torch.nn.functional.linear

    def counted(x, weight, *args, **kwargs):
        shapes.append(tuple(weight.shape))
        return linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", counted)
    return shapes


def test_a_fold_keeps_one_copy_of_the_weight_and_follows_a_write_to_it(launches, monkeypatch):
    """The folded GEMM's first rows are the base layers' weights (q's, and k's and v's after them), not a
    copy; the plain forward of the model is unchanged by folding; a write into a weight (as merge() does)
    or a new weight for k refolds."""
    bank, _ = random_bank()
    ids = token_batch(batch=2, length=4).to(DEVICE)
    with torch.no_grad():
        plain = bank.model(ids).logits
    served(bank, ids, ["a0", "a1"])  # learn the groups and fold them
    attention = bank.model.base_model.model.layers[0].self_attn
    q = "model.layers.0.self_attn.q_proj"
    fold = bank._folds._folds[q]
    assert fold.members == (q, q.replace("q_", "k_"), q.replace("q_", "v_"))
    weight = attention.q_proj.base_layer.weight
    assert weight.data_ptr() == fold.weight.data_ptr() and weight.shape[0] < fold.weight.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(bank.model(ids).logits, plain, rtol=0, atol=0)
        weight.mul_(1.5)  # the base changes: the served forward must follow it
        bank.disabled_kernels = TORCH
        reference = served(bank, ids, ["a0", "a1"])  # the torch ops, from the new weight
        bank.disabled_kernels = KERNELS
        again = served(bank, ids, ["a0", "a1"])
    assert bank._folds._folds[q] is not fold
    torch.testing.assert_close(again, reference, rtol=1e-4, atol=1e-4)
    k = attention.k_proj.base_layer
    fold = bank._folds._folds[q]
    assert k.weight.untyped_storage().data_ptr() == fold.weight.untyped_storage().data_ptr()  # a view, too
    with torch.no_grad():
        k.weight.data = k.weight.data * 0.5  # a new tensor for k alone (as load_state_dict(assign=True) does)
        bank.disabled_kernels = TORCH
        reference = served(bank, ids, ["a0", "a1"])
        bank.disabled_kernels = KERNELS
        again = served(bank, ids, ["a0", "a1"])
    assert bank._folds._folds[q] is not fold
    torch.testing.assert_close(again, reference, rtol=1e-4, atol=1e-4)


def test_a_member_called_with_another_tensor_computes_alone(launches, monkeypatch):
    bank, _ = random_bank()
    ids = token_batch(batch=2, length=4).to(DEVICE)
    served(bank, ids, ["a0", "a1"])  # learn the groups
    attention = bank.model.base_model.model.layers[0].self_attn
    x = torch.randn(2, 4, 32, device=DEVICE)
    other = x.clone()
    rows = bank.ids(["a1", "a2"])
    with torch.no_grad():
        with bank.serving(rows):
            launches.clear()
            q, k, v = attention.q_proj(x), attention.k_proj(other), attention.v_proj(x)
        assert launches == [
            ("folded", 3),
            ("folded", 1),
        ]  # q's launch computed all three; k's, for another tensor
        for layer, got, given in (
            (attention.q_proj, q, x),
            (attention.k_proj, k, other),
            (attention.v_proj, v, x),
        ):
            g_rows = bank.tables.tables[name_of(bank, layer)].index_select(0, rows)
            torch.testing.assert_close(got, layer.forward_rows(given, g_rows), rtol=1e-4, atol=1e-4)


def name_of(bank, layer):
    return next(name for name, candidate in bank.layers.items() if candidate is layer)


def test_what_the_kernel_cannot_serve_takes_the_torch_ops(launches, monkeypatch):
    """A forward that needs a gradient, and a layer whose table holds bands, go the torch way."""
    bank, _ = random_bank()
    ids = token_batch(batch=2, length=4).to(DEVICE)
    embeddings = bank.model.get_input_embeddings()(ids).requires_grad_(True)
    logits = bank(inputs_embeds=embeddings, adapter_ids=["a0", "a1"]).logits
    assert launches == [] and logits.requires_grad  # training through a bank: differentiable torch ops
    banded = "model.layers.0.mlp.up_proj"
    band = torch.zeros(3, bank.layers[banded].stored_rank)
    band[0, 1:] = 0.1
    bank.tables.write(bank.row("a0"), {banded: band})  # that layer's table becomes a table of bands
    with torch.no_grad():
        bank(ids, adapter_ids=["a0", "a1"])
    served_layers = sum(n if isinstance(n, int) else n[1] for n in launches)  # unfolded and folded
    assert served_layers == 13  # every layer but the banded one


def test_groups_are_declared_by_sibling_names_in_call_order():
    names = ["m.0.attn.q_proj", "m.0.attn.k_proj", "m.0.attn.v_proj", "m.0.attn.o_proj", "m.0.mlp.up_proj",
             "m.0.mlp.gate_proj", "m.1.attn.q_proj", "m.1.attn.k_proj"]  # fmt: skip
    groups = declared_groups(names)
    assert groups["m.0.attn.v_proj"] == ("m.0.attn.q_proj", "m.0.attn.k_proj", "m.0.attn.v_proj")
    assert groups["m.0.mlp.up_proj"] == ("m.0.mlp.gate_proj", "m.0.mlp.up_proj")
    assert "m.0.attn.o_proj" not in groups and "m.1.attn.q_proj" not in groups  # v is missing there
    assert declared_groups(["h.0.attn.c_attn", "h.0.mlp.c_fc"]) is None  # GPT-2: nothing declared, learn


def test_a_bank_folds_only_when_asked_and_unfold_gives_every_layer_its_own_weight(launches):
    """A user holding the model sees no fold until the bank is asked (fold(), as the engine does): then
    the folded layers' weights share one buffer per group with the same values; unfold() gives each its
    own storage back; the served answers and the plain model's are the same throughout."""
    bank, _ = random_bank()
    bank.unfold()
    ids = token_batch(batch=2, length=4).to(DEVICE)
    q = bank.model.base_model.model.layers[0].self_attn.q_proj.base_layer
    k = bank.model.base_model.model.layers[0].self_attn.k_proj.base_layer
    before = q.weight.detach().clone()
    with torch.no_grad():
        plain = bank.model(ids).logits
    unfolded = served(bank, ids, ["a0", "a1"])
    assert not any(isinstance(n, tuple) for n in launches)  # no folded launch
    assert q.weight.untyped_storage().data_ptr() != k.weight.untyped_storage().data_ptr()
    bank.fold()
    folded = served(bank, ids, ["a0", "a1"])
    assert any(isinstance(n, tuple) for n in launches)
    assert q.weight.untyped_storage().data_ptr() == k.weight.untyped_storage().data_ptr()  # one buffer
    bank.unfold()
    assert q.weight.untyped_storage().data_ptr() != k.weight.untyped_storage().data_ptr()
    assert torch.equal(q.weight, before)
    with torch.no_grad():
        torch.testing.assert_close(bank.model(ids).logits, plain, rtol=0, atol=0)
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(served(bank, ids, ["a0", "a1"]), unfolded, rtol=1e-4, atol=1e-4)
