"""Training through the HF Trainer (with checkpoints, resume, gradient checkpointing), the seed's
entry point, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from transformers import Trainer, TrainingArguments

from sigmatune import (
    EigenTuneConfig,
    SaveAdapterCallback,
    SigmaConfig,
    SigmaModel,
    get_eigentune_model,
    get_sigma_model,
)
from sigmatune.formats.adapter_file import WEIGHTS_NAME
from tests.models import tiny_llama, token_batch


class PeriodicSequences(torch.utils.data.Dataset):
    """Token rows i, i+3, i+6, … (mod 96): a pattern a model can learn in a few steps."""

    def __init__(self, rows: int = 32, length: int = 16):
        self.rows = [(torch.arange(length) * 3 + i) % 96 for i in range(rows)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def train(model, folder, steps=24, callbacks=None, **overrides):
    args = dict(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**{**args, **overrides}),
        train_dataset=PeriodicSequences(),
        callbacks=callbacks,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def test_trainer_lowers_the_loss_and_touches_only_the_vectors(tmp_path):
    base = tiny_llama()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_sigma_model(base, SigmaConfig(rank="full"))
    _, losses = train(model, tmp_path)
    assert losses[-1] < 0.9 * losses[0], losses
    unloaded = model.unload()
    assert all(torch.equal(unloaded.state_dict()[k], v) for k, v in frozen.items())


def test_trainer_with_gradient_checkpointing(tmp_path):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank="full"))
    _, losses = train(model, tmp_path, gradient_checkpointing=True)
    assert model.base_model.model.gradient_checkpointing
    assert losses[-1] < 0.9 * losses[0], losses


def test_trainer_checkpoints_hold_the_adapter_and_resume(tmp_path):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=8))
    train(model, tmp_path, steps=8, save_strategy="steps", save_steps=4, callbacks=[SaveAdapterCallback()])
    checkpoint = tmp_path / "checkpoint-4"
    vectors = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert vectors and all(".sigma_adapters.default.vector" in k for k in vectors)  # vectors only, no weights
    assert (checkpoint / WEIGHTS_NAME).exists()
    from_checkpoint = SigmaModel.from_pretrained(tiny_llama(), checkpoint)
    for name, layer in from_checkpoint.spectral_layers().items():
        assert torch.equal(
            layer.sigma_adapters["default"].vector,
            vectors[f"base_model.{name}.sigma_adapters.default.vector"],
        )
    final = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = get_sigma_model(tiny_llama(), SigmaConfig(rank=8))
    train(
        resumed,
        tmp_path,
        steps=8,
        save_strategy="steps",
        save_steps=4,
        resume_from_checkpoint=str(checkpoint),
    )
    for key, value in final.items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_seed_style_call_trains_the_same_way(tmp_path):
    base = tiny_llama()
    full_precision_state_dict = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_eigentune_model(
        base, EigenTuneConfig(rank=4, target_modules=["q_proj", "v_proj"]), full_precision_state_dict
    )
    assert len(model.spectral_layers()) == 4
    assert model.peft_config["default"].update == "additive"
    model.print_trainable_parameters()
    _, losses = train(model, tmp_path, learning_rate=0.3)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("update", ["additive", "multiplicative"])
def test_compiles_with_fullgraph_and_matches_eager(update):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=4, update=update, init="normal", init_std=0.1))
    ids = token_batch()
    eager = model(ids, labels=ids)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_compiles_on_cuda_with_fullgraph():
    model = get_sigma_model(
        tiny_llama(dtype=torch.bfloat16).cuda(), SigmaConfig(rank=4, init="normal", init_std=0.1)
    )
    ids = token_batch().cuda()
    eager = model(ids, labels=ids)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=5e-2, atol=5e-3)
