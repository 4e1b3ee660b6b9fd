"""TRL's trainers train a SigmaModel as they train a PEFT model: the real `trl` package on a tiny chat
model built from a config (a saved from_pretrained folder), on CPU."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from sigmatune import SaveAdapterCallback, SigmaConfig, SigmaModel, get_sigma_model
from sigmatune.formats.adapter_file import WEIGHTS_NAME
from sigmatune.hub.loading import load_model
from tests.models import save_tiny_chat_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

QUESTIONS = [(f"Is {i} even?", "yes" if i % 2 == 0 else "no") for i in range(64)]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    texts = [f"{q} {a}" for q, a in QUESTIONS] + ["system user assistant"]
    return save_tiny_chat_model(tmp_path_factory.mktemp("trl") / "model", texts)


def conversations():
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QUESTIONS]
    return datasets.Dataset.from_list([{"messages": messages} for messages in rows])


def test_sft_trainer_trains_only_the_adapter_and_its_checkpoints_hold_only_it(base_folder, tmp_path):
    base, tokenizer = load_model(str(base_folder))
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_sigma_model(base, SigmaConfig(rank="full"))
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8, learning_rate=0.1,
        lr_scheduler_type="constant", logging_steps=2, save_strategy="steps", save_steps=6, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, gradient_checkpointing=True, max_length=64, bf16=False,  # fp32
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=conversations(), processing_class=tokenizer,
        callbacks=[SaveAdapterCallback()],
    )  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.9 * losses[0], losses
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}  # the vectors, nothing else
    assert model.base_model.model.gradient_checkpointing
    checkpoint = tmp_path / "run" / "checkpoint-6"
    kept = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert kept and all(".sigma_adapters.default.vector" in k for k in kept)  # no base weights
    assert (checkpoint / WEIGHTS_NAME).exists()
    ids = tokenizer("Is 7 even?", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = SigmaModel.from_pretrained(load_model(str(base_folder))[0], tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    unloaded = model.unload()  # the base weights came through untouched
    assert all(torch.equal(unloaded.state_dict()[k], v) for k, v in frozen.items())


def test_dpo_trainer_learns_a_preference(base_folder, tmp_path):
    base, tokenizer = load_model(str(base_folder))
    model = get_sigma_model(base, SigmaConfig(rank="full"))
    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for q, _ in QUESTIONS
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "run"), max_steps=24, per_device_train_batch_size=8, learning_rate=0.1,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        bf16=False, max_length=64,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["loss"] < 0.8 * logged[0]["loss"], logged
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"] > 0  # "yes" over "no", more and more
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
