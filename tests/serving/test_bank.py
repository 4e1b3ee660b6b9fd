"""AdapterBank: a mixed batch equals each adapter run alone (prefill and decode), nesting, mixes,
eviction to disk and back, and the errors that name the fix."""

from __future__ import annotations

import pytest
import torch

from sigmatune import AdapterBank, BaseModelMismatchError, SigmaConfig, SigmaModel, get_sigma_model
from tests.models import randomize, tiny_llama, token_batch

BANK = SigmaConfig(rank=8, svd="exact")  # the bank's bases: top-8 of every linear layer
ADAPTERS = {
    "wide": SigmaConfig(rank=8, svd="exact"),
    "attn": SigmaConfig(rank=4, target_modules=["q_proj", "v_proj"], update="additive", svd="exact"),
    "mlp": SigmaConfig(rank=6, target_modules=r".*mlp.*", svd="exact"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three trained-looking adapters of tiny_llama(), saved; name → folder."""
    folders = {}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model = get_sigma_model(tiny_llama(), config)
        randomize(model, seed=seed, scale=0.3)
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
    return folders


@pytest.fixture
def bank(saved):
    bank = AdapterBank.over(tiny_llama(), BANK)
    for name, folder in saved.items():
        bank.load(name, folder)
    return bank


def alone(folder, ids, **generate):
    """Logits (or generated tokens) of one adapter on its own, the plain way."""
    model = SigmaModel.from_pretrained(tiny_llama(), folder) if folder else tiny_llama()
    with torch.no_grad():
        return model.generate(ids, **generate) if generate else model(ids).logits


def test_mixed_prefill_equals_each_adapter_alone(bank, saved):
    names = ["wide", "base", "attn", "mlp", "wide"]
    ids = token_batch(batch=len(names), length=10)
    with torch.no_grad():
        mixed = bank(ids, adapter_ids=names).logits
    for row, name in enumerate(names):
        expected = alone(saved.get(name), ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], expected, rtol=1e-5, atol=1e-5)


def test_mixed_decode_with_kv_cache_equals_each_adapter_alone(bank, saved):
    names = ["attn", "wide", "base", "mlp"]
    ids = token_batch(batch=len(names), length=6, seed=5)
    with torch.no_grad():
        mixed = bank.generate(ids, adapter_ids=names, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert mixed.shape == (len(names), 14)
    for row, name in enumerate(names):
        expected = alone(
            saved.get(name), ids[row : row + 1], max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        assert torch.equal(mixed[row : row + 1], expected), name


def test_a_mix_is_the_adapter_with_mixed_vectors(bank, saved, tmp_path):
    bank.add_mix("blend", {"wide": 0.25, "mlp": 0.75})
    ids = token_batch(batch=1, length=7)
    with torch.no_grad():
        mixed = bank(ids, adapter_ids=["blend"]).logits
    # the same update built by hand: one multiplicative adapter whose vector is the mix
    reference = get_sigma_model(tiny_llama(), SigmaConfig(rank=8, svd="exact"))
    wide = SigmaModel.from_pretrained(tiny_llama(), saved["wide"])
    mlp = SigmaModel.from_pretrained(tiny_llama(), saved["mlp"])
    with torch.no_grad():
        for name, layer in reference.spectral_layers().items():
            vector = 0.25 * wide.spectral_layers()[name].scales("default")
            if name in mlp.spectral_layers():
                top6 = mlp.spectral_layers()[name].scales("default")  # its top-6 sit in the first 6 of 8
                vector = vector + 0.75 * torch.nn.functional.pad(top6, (0, 2))
            layer.sigma_adapters["default"].vector.copy_(vector)
        torch.testing.assert_close(mixed, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_eviction_to_disk_and_back(saved, tmp_path):
    bank = AdapterBank.over(tiny_llama(), BANK, max_resident=2, spill_dir=tmp_path)
    bank.load("wide", saved["wide"])
    bank.load("attn", saved["attn"])
    bank.add_mix("blend", {"wide": 0.5, "attn": 0.5})  # evicts the least recently used: "wide"
    assert list(bank.rows) == ["attn", "blend"] and len(bank.rows) == 2
    ids = token_batch(batch=1, length=5)
    with torch.no_grad():
        blend = bank(ids, adapter_ids=["blend"]).logits
        wide = bank(ids, adapter_ids=["wide"]).logits  # reloaded from its folder, evicting "attn"
        torch.testing.assert_close(wide, alone(saved["wide"], ids), rtol=1e-5, atol=1e-5)
        again = bank(ids, adapter_ids=["attn", "blend"][1:]).logits  # still resident
        torch.testing.assert_close(again, blend, rtol=0, atol=0)
        bank.row("wide")
        bank.row("attn")  # back from its folder; now "blend" is the least recently used and leaves
        assert "blend" not in bank.rows and list(tmp_path.glob("*.safetensors"))
        torch.testing.assert_close(bank(ids, adapter_ids=["blend"]).logits, blend, rtol=1e-6, atol=1e-6)


def test_replace_and_remove(bank, saved):
    ids = token_batch(batch=1, length=5)
    with pytest.raises(ValueError, match="already in the bank; pass replace=True"):
        bank.load("wide", saved["mlp"])
    bank.load("wide", saved["mlp"], replace=True)
    with torch.no_grad():
        torch.testing.assert_close(bank(ids, adapter_ids=["wide"]).logits, alone(saved["mlp"], ids))
    bank.remove("wide")
    with pytest.raises(KeyError, match="unknown adapter 'wide'"):
        bank.row("wide")
    assert bank.names() == ["base", "attn", "mlp"]


def test_errors_name_the_problem(saved, tmp_path):
    small = AdapterBank.over(tiny_llama(), SigmaConfig(rank=4, svd="exact"))
    with pytest.raises(ValueError, match=r"selects singular directions \[4, 5, 6, 7\].*larger rank"):
        small.load("wide", saved["wide"])
    attention_only = AdapterBank.over(
        tiny_llama(), SigmaConfig(rank=8, target_modules=["q_proj"], svd="exact")
    )
    with pytest.raises(ValueError, match="adapts layers the bank has no bases for"):
        attention_only.load("attn", saved["attn"])
    other_base = AdapterBank.over(tiny_llama(seed=3), BANK)
    with pytest.raises(BaseModelMismatchError):
        other_base.load("wide", saved["wide"])
    with pytest.raises(ValueError, match="'base' is the base model's name"):
        other_base.add_mix("base", {"base": 1.0})
    with pytest.raises(ValueError, match="adapter_ids needs an AdapterBank"):
        get_sigma_model(tiny_llama(), BANK)(token_batch(batch=1), adapter_ids=[0])


def test_thousands_of_resident_adapters(saved):
    bank = AdapterBank.over(tiny_llama(), BANK)
    bank.load("wide", saved["wide"])
    for i in range(2000):  # each a different mix: 2,001 resident rows
        bank.add_mix(f"m{i}", {"wide": i / 2000})
    assert len(bank.rows) == 2001 and bank.memory_bytes() >= 2001 * 14 * 8 * 4
    ids = token_batch(batch=3, length=4)
    names = ["m0", "m1000", "wide"]
    with torch.no_grad():
        out = bank(ids, adapter_ids=names).logits
        torch.testing.assert_close(out[0:1], alone(None, ids[0:1]), rtol=1e-5, atol=1e-5)  # weight 0 = base
        torch.testing.assert_close(out[2:3], alone(saved["wide"], ids[2:3]), rtol=1e-5, atol=1e-5)


def test_a_mix_follows_its_adapter_when_it_is_reloaded_or_removed(saved):
    """Issue 38, item 6: a mix's row is Σ w_k G[k] at the time it was made; reloading an adapter (a new
    folder under the same name) rebuilds every mix of it, resident or spilled; removing it drops them."""
    bank = AdapterBank.over(tiny_llama(), BANK, max_resident=3)
    bank.load("qa2", saved["wide"])
    bank.load("attn", saved["attn"])
    bank.add_mix("solo", {"qa2": 1.0})
    ids = token_batch(batch=1, length=6, seed=3)
    with torch.no_grad():
        before = bank(ids, adapter_ids=["solo"]).logits
        bank.add_mix("half", {"qa2": 0.5, "attn": 0.5})  # evicts "solo": a spilled mix must follow too
        assert "solo" not in bank.rows
        bank.load("qa2", saved["mlp"], replace="qa2" in bank.rows)  # the folder now holds another adapter
        new = alone(saved["mlp"], ids)
        assert not torch.allclose(before, new, atol=1e-3)  # else the test proves nothing
        torch.testing.assert_close(bank(ids, adapter_ids=["qa2"]).logits, new, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bank(ids, adapter_ids=["solo"]).logits, new, rtol=1e-5, atol=1e-5)
        reference = AdapterBank.over(tiny_llama(), BANK)
        reference.load("qa2", saved["mlp"])
        reference.load("attn", saved["attn"])
        reference.add_mix("half", {"qa2": 0.5, "attn": 0.5})
        torch.testing.assert_close(
            bank(ids, adapter_ids=["half"]).logits,
            reference(ids, adapter_ids=["half"]).logits,
            rtol=1e-5,
            atol=1e-5,
        )
    bank.remove("qa2")
    assert bank.names() == ["base", "attn"] and not bank.mixes
    with pytest.raises(KeyError, match="unknown adapter 'solo'"):
        bank.row("solo")


def test_a_mix_has_one_canonical_name():
    """Weights are numbers and the order of the parts does not matter: one row per mix."""
    name = AdapterBank.mix_name({"b": 1, "a": 0.5})
    assert name == AdapterBank.mix_name({"a": 0.50, "b": 1.0}) == "mix:a=0.5,b=1.0"
    assert AdapterBank.mix_name({"a": -0.0}) == "mix:a=0.0"
