"""Loading an adapter by its folder alone (AutoSigmaModelForCausalLM) and the model card beside it, on a
tiny real Llama saved as a from_pretrained folder."""

from __future__ import annotations

import os

import pytest
import torch

from sigmatune import AutoSigmaModelForCausalLM, SigmaConfig, get_sigma_model, read_adapter
from sigmatune.formats.adapter_file import CONFIG_NAME, WEIGHTS_NAME
from sigmatune.formats.model_card import CARD_NAME
from sigmatune.hub import loading
from sigmatune.hub.loading import load_model
from tests.models import randomize, save_tiny_chat_model, token_batch


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("base") / "model", ["Is 3 even? no", "system user"])


def trained(base_name: str, out, **kwargs):
    """A randomised full-spectrum adapter of the base loaded by this name, saved to out; its logits."""
    model, _ = load_model(base_name, **kwargs)
    sigma_model = get_sigma_model(model, SigmaConfig(rank="full"))
    randomize(sigma_model, scale=0.1)
    sigma_model.save_pretrained(out)
    with torch.no_grad():
        return sigma_model(token_batch()).logits


def test_an_adapter_loads_by_its_folder_alone(base_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(base_folder.parent)
    want = trained("./model", tmp_path / "adapter")  # a relative path: recorded as an absolute one
    assert read_adapter(tmp_path / "adapter").base_model_name_or_path == str(base_folder.resolve())
    monkeypatch.chdir(tmp_path)
    model = AutoSigmaModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float64)
    assert next(model.base_model.parameters()).dtype == torch.float64  # keywords reach from_pretrained
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch()).logits.float(), want, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in model.parameters())  # for inference, as PEFT loads
    trainable = AutoSigmaModelForCausalLM.from_pretrained(tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_the_alias_is_recorded_and_a_missing_base_is_named(base_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "smollm2_path", lambda: base_folder)  # the default model's cache folder
    want = trained("smollm2", tmp_path / "adapter")
    assert read_adapter(tmp_path / "adapter").base_model_name_or_path == "smollm2"  # not the cache folder
    model = AutoSigmaModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch()).logits, want)
    gone = tmp_path / "moved"
    os.rename(base_folder, gone)
    try:
        trained_elsewhere = tmp_path / "other"
        trained(str(gone), trained_elsewhere)
        os.rename(gone, tmp_path / "moved again")
        with pytest.raises(ValueError, match=r"its base model .*moved.* is not there; pass base_model="):
            AutoSigmaModelForCausalLM.from_pretrained(trained_elsewhere)
        (tmp_path / "empty").mkdir()  # a folder, but no model in it
        with pytest.raises(ValueError, match=r"(?s)could not be loaded .*pass base_model="):
            AutoSigmaModelForCausalLM.from_pretrained(trained_elsewhere, base_model=str(tmp_path / "empty"))
        loaded = AutoSigmaModelForCausalLM.from_pretrained(
            trained_elsewhere, base_model=str(tmp_path / "moved again")
        )
        assert loaded.spectral_layers()
    finally:
        os.rename(tmp_path / "moved again", base_folder)


def test_save_pretrained_writes_a_model_card_apart_from_the_adapter(base_folder, tmp_path):
    out = tmp_path / "adapter"
    trained(str(base_folder), out)
    card = (out / CARD_NAME).read_text()
    record = read_adapter(out)  # the card is no part of the adapter: it loads as before
    numbers = sum(layer.vector.numel() for layer in record.layers.values())
    assert f"base_model: {base_folder.resolve()}" in card and "library_name: sigmatune" in card
    assert (
        f"| trained numbers | {numbers:,} |" in card and "AutoSigmaModelForCausalLM.from_pretrained" in card
    )
    assert "license: #" in card and card.startswith(
        "---\n"
    )  # left to the user; the Hub reads a header on top
    assert {p.name for p in out.iterdir()} == {WEIGHTS_NAME, CONFIG_NAME, CARD_NAME}
    (out / CARD_NAME).write_text("# my own notes\n")
    trained(str(base_folder), out)  # saved again: the user's README.md stays
    assert (out / CARD_NAME).read_text() == "# my own notes\n"
