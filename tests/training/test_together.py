"""Several adapters trained at once (model/together.py, training/together_loop.py): K adapters in one batch
are each the adapter trained alone on its rows — the forward, the gradients and whole runs, in fp64, for
every structure and both update rules; a member that fails stops alone; a resumed run ends where an
uninterrupted one does."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import sigmatune.training.loop as loop
import sigmatune.training.together_loop as together_loop
from sigmatune import SigmaConfig, get_sigma_model
from sigmatune.formats import checkpoint
from sigmatune.hub.loading import load_model
from sigmatune.model.together import Together
from sigmatune.training.data import Example, Task, load_task
from sigmatune.training.settings import TrainSettings
from sigmatune.training.together_loop import Member, fit_together
from tests.models import randomize, save_tiny_chat_model, tiny_llama, token_batch

CONFIGS = {
    "diagonal": SigmaConfig(rank=6, svd="exact"),
    "additive": SigmaConfig(rank="full", svd="exact", update="additive"),
    "band": SigmaConfig(rank=6, structure="band", band=1, svd="exact"),
    "dense": SigmaConfig(rank=5, structure="dense", svd="exact"),
}
PARITY = [{"input": f"Is {n} even?", "output": "yes" if n % 2 == 0 else "no"} for n in range(80)]


def three_adapters(config: SigmaConfig, wider: SigmaConfig | None = None):
    """A tiny fp64 Llama with adapters a, b, c of `config`, random; with `wider`, an adapter of it first,
    so the layers store more directions than a, b and c use (their positions are a subset)."""
    model = get_sigma_model(tiny_llama(dtype=torch.float64), wider or config, "wide" if wider else "a")
    for name in ["b", "c"] + (["a"] if wider else []):
        model.add_adapter(name, config)
    for seed, name in enumerate("abc"):
        model.set_adapter(name)
        randomize(model, seed=seed, scale=0.2)
    return model


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("subset", [False, True], ids=["all-stored", "subset"])
def test_a_mixed_batch_is_each_adapter_alone_values_and_gradients(kind, subset):
    wider = dataclasses.replace(CONFIGS[kind], rank=8) if subset and kind != "additive" else None
    model = three_adapters(CONFIGS[kind], wider)
    tokens, ids = token_batch(batch=6), torch.tensor([0, 1, 2, 2, 0, 1])
    alone = {}
    for k, name in enumerate("abc"):
        model.set_adapter(name)
        out = model(input_ids=tokens[ids == k]).logits
        out.square().sum().backward()
        grads = {n: layer.sigma_adapters[name].vector.grad for n, layer in model.spectral_layers().items()}
        alone[name] = out.detach(), {n: g for n, g in grads.items() if g is not None}
        model.zero_grad(set_to_none=True)
    with Together(model, list("abc")) as together:
        together.rows(ids)
        out = model(input_ids=tokens).logits
        out.square().sum().backward()
        banks = together.banks()
        assert banks.keys() == alone["a"][1].keys()
        for k, name in enumerate("abc"):
            torch.testing.assert_close(out[ids == k], alone[name][0], rtol=1e-10, atol=1e-10)
            for layer, bank in banks.items():
                torch.testing.assert_close(bank.grad[k], alone[name][1][layer], rtol=1e-10, atol=1e-10)


def test_adapters_see_their_rows_of_the_bank_and_get_their_own_copies_back():
    model = three_adapters(CONFIGS["band"])
    layer = next(iter(model.spectral_layers().values()))
    before = layer.sigma_adapters["b"].vector.detach().clone()
    with Together(model, list("abc")) as together:
        bank = together.banks()[next(iter(model.spectral_layers()))]
        with torch.no_grad():
            bank[1].add_(1.0)
        torch.testing.assert_close(layer.sigma_adapters["b"].vector, before + 1)  # a view of row 1
        assert not layer.sigma_adapters["b"].vector.requires_grad
    assert not hasattr(layer, "sigma_bank")
    vector = layer.sigma_adapters["b"].vector
    torch.testing.assert_close(vector, before + 1)
    assert vector._base is None  # its own tensor again, no longer a view of the (gone) bank
    model.set_adapter("b")
    assert vector.requires_grad and not layer.sigma_adapters["a"].vector.requires_grad


def test_adapters_of_different_configs_or_a_missing_forward_are_refused():
    model = three_adapters(CONFIGS["diagonal"])
    model.add_adapter("band", dataclasses.replace(CONFIGS["band"], rank=6))
    with pytest.raises(ValueError, match="differ in their structure"):
        Together(model, ["a", "band"])
    with pytest.raises(KeyError, match="no adapter 'zz'"):
        Together(model, ["a", "zz"])
    with Together(model, ["a", "b"]), pytest.raises(ValueError, match=r"Together\.rows"):
        model(input_ids=token_batch(batch=2))
    with Together(model, ["a", "b"]) as together:
        together.rows(torch.tensor([0, 1, 1]))
        with pytest.raises(ValueError, match="2 rows but rows\\(\\) was given 3"):
            model(input_ids=token_batch(batch=2))
        with pytest.raises(ValueError, match="one adapter index in \\[0, 2\\)"):
            together.rows(torch.tensor([0, 2]))


def test_adapters_of_other_layers_are_refused_in_either_order_and_a_failed_entry_leaves_nothing_behind():
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=4, target_modules=["q_proj"]), "q")
    model.add_adapter("qv", SigmaConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    for names in (["q", "qv"], ["qv", "q"]):
        with pytest.raises(ValueError, match=r"adapts layer .*v_proj.* does not"):
            Together(model, names)
    for name, targets in (("v", ["v_proj"]), ("v2", ["v_proj"]), ("qv2", ["q_proj", "v_proj"])):
        model.add_adapter(name, SigmaConfig(rank=4, target_modules=targets))
    layers = model.spectral_layers()
    with Together(model, ["v", "v2"]):  # an outer block holds the v layers
        inner = Together(model, ["qv", "qv2"])  # stacks layer 0's q, then fails at its v
        with pytest.raises(ValueError, match="already trains adapters together"):
            inner.__enter__()
        q0 = layers["model.layers.0.self_attn.q_proj"]
        assert not hasattr(q0, "sigma_bank") and q0._row_scales is None  # undone
        assert q0.sigma_adapters["qv"].vector._base is None  # its own tensor again, not a view of a bank
        assert hasattr(layers["model.layers.0.self_attn.v_proj"], "sigma_bank")  # the outer block's, kept
    assert all(not hasattr(layer, "sigma_bank") for layer in layers.values())


def test_after_the_block_only_the_active_adapter_trains():
    model = three_adapters(CONFIGS["diagonal"])
    model.set_adapter("a")
    with Together(model, list("abc")):
        model.set_adapter("b")  # inside the block: takes effect after it
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".sigma_adapters.b." in n for n in trainable)
    model.set_adapter("c")
    assert all(".sigma_adapters.c." in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.training_together is None


# ---- whole runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder = tmp_path_factory.mktemp("together")
    save_tiny_chat_model(folder / "model", [f"{r['input']} {r['output']}" for r in PARITY] + ["system user"])
    (folder / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in PARITY))
    model, tokenizer = load_model(str(folder / "model"), torch.float64, torch.device("cpu"))
    return folder, model, tokenizer


def members_of(folder, config_kind: str, lrs, seeds, steps=(6, 6, 6)) -> list[Member]:
    task = load_task(str(folder / "parity.jsonl"), heldout=10, seed=0)
    base = TrainSettings(batch_size=4, steps=6, warmup=0.2, save_every=0, packing=False)
    return [
        Member(f"m{k}", task, dataclasses.replace(base, lr=lr, seed=seed, steps=n))
        for k, (lr, seed, n) in enumerate(zip(lrs, seeds, steps, strict=True))
    ]


def trained_alone(chat, config, member: Member, packed=False) -> dict[str, torch.Tensor]:
    _, base, tokenizer = chat
    model = get_sigma_model(base, config)
    loop.fit(model, tokenizer, member.task, member.settings, torch.device("cpu"), packed=packed)
    vectors = {
        n: layer.sigma_adapters["default"].vector.detach().clone()
        for n, layer in model.spectral_layers().items()
    }
    model.unload()
    return vectors


def trained_together(chat, config, members: list[Member], **options):
    _, base, tokenizer = chat
    model = get_sigma_model(base, config, members[0].name)
    for member in members[1:]:
        model.add_adapter(member.name, config)
    try:
        outcome = fit_together(model, tokenizer, members, torch.device("cpu"), **options)
        vectors = {
            m.name: {
                n: layer.sigma_adapters[m.name].vector.detach().clone()
                for n, layer in model.spectral_layers().items()
            }
            for m in members
        }
    finally:
        model.unload()
    return outcome, vectors


@pytest.mark.parametrize(
    "kind, packed", [*((kind, False) for kind in CONFIGS), ("diagonal", True), ("band", True)]
)
def test_a_run_of_three_adapters_ends_where_three_runs_alone_end(chat, kind, packed):
    members = members_of(chat[0], kind, lrs=(0.05, 0.02, 0.1), seeds=(0, 0, 3), steps=(6, 4, 6))
    outcome, together = trained_together(chat, CONFIGS[kind], members, packed=packed)
    assert not outcome.failed and [len(outcome.histories[m.name]) for m in members] == [6, 4, 6]
    for member in members:
        alone = trained_alone(chat, CONFIGS[kind], member, packed)
        for layer, vector in alone.items():
            torch.testing.assert_close(together[member.name][layer], vector, rtol=1e-9, atol=1e-11)
        assert float(max(v.abs().max() for v in alone.values())) > 1e-3  # they did train


def test_a_member_whose_data_gives_nan_stops_alone_and_the_others_finish(chat):
    folder = chat[0]
    members = members_of(folder, "diagonal", lrs=(0.05, 0.05, 0.05), seeds=(0, 1, 2))
    empty = [Example(None, [""])] * 20  # empty lines of text: one token (the end), no label to predict: 0/0
    members[1] = Member("m1", Task("empty", None, empty, empty, "test"), members[1].settings)
    outcome, together = trained_together(chat, CONFIGS["diagonal"], members)
    assert (
        list(outcome.failed) == ["m1"]
        and "adapter 'm1': the training loss became nan at step 1" in outcome.failed["m1"]
    )
    for member in (members[0], members[2]):
        alone = trained_alone(chat, CONFIGS["diagonal"], member)
        for layer, vector in alone.items():
            torch.testing.assert_close(together[member.name][layer], vector, rtol=1e-9, atol=1e-11)


def memory_for(monkeypatch, members: int, also_at: int = 0) -> list[int]:
    """A device with memory for `members` members' rows a pass: a larger pass raises the allocator's
    torch.OutOfMemoryError (as a CUDA device does) before the forward, packed or padded; so does pass number
    `also_at` (memory another process took for a moment). The members of every pass tried are recorded."""
    tried = []

    def limited(real):
        def losses(model, *args):
            ids = model.training_together._ids  # the rows of this pass, by member
            tried.append(len(set(ids.tolist())))
            if tried[-1] > members or len(tried) == also_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB (simulated)")
            return real(model, *args)

        return losses

    monkeypatch.setattr(together_loop, "row_losses", limited(together_loop.row_losses))
    monkeypatch.setattr(together_loop, "packed_row_losses", limited(together_loop.packed_row_losses))
    return tried


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_out_of_memory_runs_a_step_in_passes_of_fewer_members_with_the_same_result(
    chat, monkeypatch, capsys, packed
):
    members = members_of(chat[0], "band", lrs=(0.05, 0.02, 0.1), seeds=(0, 1, 2), steps=(6, 6, 4))
    members.append(Member("m3", members[0].task, dataclasses.replace(members[0].settings, lr=0.03, seed=5)))
    whole, expected = trained_together(chat, CONFIGS["band"], members, packed=packed)
    tried = memory_for(
        monkeypatch, 2, also_at=7
    )  # pass 7: step 3's second pass, after its first one's backward
    outcome, vectors = trained_together(chat, CONFIGS["band"], members, packed=packed)
    # step 1: 4 members a pass ran out, then 2 + 2; step 2: 2 + 2; step 3: 2, then 2 ran out, then 1 a pass
    assert tried[:11] == [4, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1] and set(tried[11:]) == {1}
    said = capsys.readouterr().err
    assert "out of memory at step 1 with 4 adapters' batches a pass: now 2 a pass" in said
    assert "out of memory at step 3 with 2 adapters' batches a pass: now 1 a pass" in said
    assert outcome.histories == whole.histories and not outcome.failed
    for member in members:
        for layer, vector in expected[member.name].items():
            torch.testing.assert_close(vectors[member.name][layer], vector, rtol=1e-9, atol=1e-11)


def test_out_of_memory_with_one_member_a_pass_is_an_error_naming_the_fix(chat, monkeypatch):
    memory_for(monkeypatch, 0)
    members = members_of(chat[0], "diagonal", lrs=(0.05, 0.05), seeds=(0, 1), steps=(6, 6))
    with pytest.raises(
        MemoryError, match=r"out of memory at step 1 with one adapter's batch a pass .*lower --batch-size"
    ):
        trained_together(chat, CONFIGS["diagonal"], members)


def crash_at_call(monkeypatch, call: int) -> None:
    """Interrupt a run (KeyboardInterrupt) at its call-th padded loss: step `call` of a run without packing."""
    real, calls = together_loop.row_losses, [0]

    def row_losses(*args):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(together_loop, "row_losses", row_losses)


def test_a_run_cut_short_resumes_to_the_uninterrupted_result(chat, tmp_path, monkeypatch):
    members = members_of(chat[0], "band", lrs=(0.05, 0.02, 0.1), seeds=(0, 1, 2))
    members = [Member(m.name, m.task, dataclasses.replace(m.settings, save_every=2)) for m in members]
    whole, expected = trained_together(chat, CONFIGS["band"], members)
    crash_at_call(monkeypatch, 4)
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    with pytest.raises(KeyboardInterrupt):
        trained_together(chat, CONFIGS["band"], members, path=path)
    monkeypatch.undo()
    saved = checkpoint.load(path)
    assert saved.step == 2
    resumed, vectors = trained_together(chat, CONFIGS["band"], members, path=path, resumed=saved)
    assert resumed.histories == whole.histories and not resumed.failed
    for member in members:
        for layer, vector in expected[member.name].items():
            torch.testing.assert_close(vectors[member.name][layer], vector, rtol=1e-12, atol=1e-14)


# ---- the HF Trainer ---------------------------------------------------------------------------------------


class Tagged(torch.utils.data.Dataset):
    """Token rows, each tagged with the adapter that learns it: "a" learns i, i+3, …; "b" learns i, i+5, …"""

    def __init__(self, rows: int = 32, length: int = 12):
        self.rows = [(torch.arange(length) * (3 if i % 2 else 5) + i) % 96 for i in range(rows)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i], "adapter": "a" if i % 2 else "b"}


@pytest.mark.parametrize("own_optimizer", [False, True], ids=["trainer-adamw", "rows-adamw"])
def test_the_hf_trainer_trains_adapters_together_from_a_collator_of_adapter_ids(tmp_path, own_optimizer):
    from transformers import Trainer, TrainingArguments

    from sigmatune import AdapterIdsCollator, RowsAdamW

    model = get_sigma_model(tiny_llama(), CONFIGS["diagonal"], "a")
    for name in ("b", "idle"):
        model.add_adapter(name, CONFIGS["diagonal"])
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=8, learning_rate=0.3,
        lr_scheduler_type="constant", logging_steps=4, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    with Together(model, ["a", "b", "idle"]) as together:
        optimizers = (RowsAdamW(together.banks().values(), torch.tensor([0.3, 0.3, 0.3])), None)
        trainer = Trainer(
            model=model, args=args, train_dataset=Tagged(), data_collator=AdapterIdsCollator(),
            optimizers=optimizers if own_optimizer else (None, None),
        )  # fmt: skip
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.95 * losses[0], losses
    layers = model.spectral_layers().values()
    for name in ("a", "b"):
        assert max(float(layer.sigma_adapters[name].vector.abs().max()) for layer in layers) > 1e-3
    assert all(
        float(layer.sigma_adapters["idle"].vector.abs().max()) == 0 for layer in layers
    )  # no rows of its own
    with pytest.raises(ValueError, match="train several adapters on a mixed batch"):
        model(input_ids=token_batch(batch=2), adapter_ids=[0, 1])  # outside the block: refused


# ---- compiled, quantized bases, bf16 ------------------------------------------------------------------------


def mixed_forward_and_grads(model, tokens, ids, run=None):
    """(logits, {layer: bank gradient}) of one mixed-batch forward and backward inside a Together block."""
    with Together(model, list("abc")) as together:
        together.rows(ids)
        out = (model if run is None else run)(input_ids=tokens, labels=tokens)
        out.loss.backward()
        return out.logits.detach(), {n: b.grad.clone() for n, b in together.banks().items()}


def test_a_compiled_model_trains_adapters_together_as_the_eager_one():
    model = three_adapters(dataclasses.replace(CONFIGS["band"], svd="exact"))
    model.float()
    tokens, ids = token_batch(batch=6), torch.tensor([2, 0, 1, 1, 0, 2])
    eager, eager_grads = mixed_forward_and_grads(model, tokens, ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits, grads = mixed_forward_and_grads(model, tokens, ids, compiled)
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_adapters_train_together_on_a_quantized_base_as_each_alone():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    base = tiny_llama()
    quantize_(base, Int8WeightOnlyConfig())
    model = get_sigma_model(base, SigmaConfig(rank=4, svd="exact"), "a")
    for name in "bc":
        model.add_adapter(name, SigmaConfig(rank=4, svd="exact"))
    for seed, name in enumerate("abc"):
        model.set_adapter(name)
        randomize(model, seed=seed, scale=0.2)
    tokens, ids = token_batch(batch=3), torch.tensor([0, 1, 2])
    mixed, _ = mixed_forward_and_grads(model, tokens, ids)
    for k, name in enumerate("abc"):
        model.set_adapter(name)
        with torch.no_grad():
            alone = model(input_ids=tokens[k : k + 1]).logits
        torch.testing.assert_close(mixed[k : k + 1], alone, rtol=1e-4, atol=1e-4)


def test_in_bf16_a_mixed_batch_is_each_adapter_alone_within_its_rounding():
    model = three_adapters(CONFIGS["diagonal"])
    reference, _ = mixed_forward_and_grads(model, token_batch(batch=3), torch.tensor([0, 1, 2]))
    model.to(torch.bfloat16)
    mixed, grads = mixed_forward_and_grads(model, token_batch(batch=3), torch.tensor([0, 1, 2]))
    for k, name in enumerate("abc"):
        model.set_adapter(name)
        with torch.no_grad():
            alone = model(input_ids=token_batch(batch=3)[k : k + 1]).logits
        torch.testing.assert_close(mixed[k : k + 1].float(), alone.float(), rtol=2e-2, atol=2e-2)
    assert (mixed.double() - reference).abs().max() < 0.1 * reference.abs().max()
    assert all(torch.isfinite(g).all() and float(g.abs().max()) > 0 for g in grads.values())
