"""Compression weighed by calibration data (model/compress.py): the second moments of z = Vᵀx that the
hooks gather, the optimality of the calibrated choice for a diagonal (per layer, on the data), and the
`sigmatune compress` command calibrating on the adapter's training data or on --data."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from sigmatune import SigmaConfig, get_sigma_model, read_adapter
from sigmatune.cli import main
from sigmatune.core.structures.band import valid_part
from sigmatune.hub.loading import load_model
from sigmatune.model.compress import _singular_update, activation_moments
from sigmatune.training.job import SUMMARY_NAME, train
from tests.models import logits, randomize, save_tiny_chat_model, tiny_gpt2, tiny_llama, token_batch
from tests.training.test_train import settings, workspace  # noqa: F401 (a fixture)

FULL = SigmaConfig(rank="full", svd="exact")


def calibration(count: int = 3, length: int = 10) -> list[torch.Tensor]:
    return [token_batch(seed=10 + i, batch=1, length=length) for i in range(count)]


def layer_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Each spectral layer's inputs (N, d) over the batches, as the model runs now."""
    seen, hooks = {}, []
    for name, layer in model.spectral_layers().items():
        hook = lambda _, args, n=name: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]))  # noqa: E731
        hooks.append(layer.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(xs).double() for name, xs in seen.items()}


def output_error(layer, x: torch.Tensor, adapter: str) -> float:
    """‖y_default − y_adapter‖² of one layer over inputs x."""
    with torch.no_grad():
        layer.set_adapter(adapter)
        out = layer(x)
        layer.set_adapter("default")
        return float((layer(x) - out).double().square().sum())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2 (biases, Conv1D)"])
def test_the_moments_are_those_of_the_right_singular_vectors(make):
    base = make()
    with torch.no_grad():  # biases that matter (HF initialises them to zero)
        for name, param in base.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model = get_sigma_model(base, SigmaConfig(rank=6, svd="exact"))
    randomize(model, scale=0.2)
    batches = calibration()
    inputs = layer_inputs(model, batches)
    moments = activation_moments(model, "default", batches)
    sides = set()
    for name, layer in model.spectral_layers().items():
        _, v = layer.singular_vectors(layer.stored_rank)  # fp64, from W itself on the side not stored
        expected = (inputs[name] @ v).square().mean(dim=0)
        torch.testing.assert_close(moments[name].double(), expected, rtol=1e-4, atol=1e-7)
        sides.add(layer.side)
    assert sides == {"input", "output"}


def test_calibrated_choice_is_the_best_subset_of_each_layer_on_the_data():
    """For a diagonal, dropping D costs Σ_{i∈D} δ_i² Σ_tokens z_i² at the layer's output: the calibrated
    choice equals the best of all subsets (brute force over the layer's actual outputs), and the data-free
    choice is never better."""
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=6, svd="exact"))
    randomize(model, scale=0.3)
    batches = calibration()
    inputs = layer_inputs(model, batches)
    model.compress(3, "default", "calibrated", calibration=batches)
    model.compress(3, "default", "plain")
    differs = 0
    for name, layer in model.spectral_layers().items():
        x = inputs[name].float()

        _, v = layer.singular_vectors(layer.stored_rank)
        energy = (inputs[name] @ v).square().sum(dim=0)  # Σ_tokens z_i²
        delta = torch.diagonal(_singular_update(layer, "default")).double()
        cost = {
            kept: float((delta**2 * energy).sum() - (delta[list(kept)] ** 2 * energy[list(kept)]).sum())
            for kept in itertools.combinations(range(6), 3)
        }
        chosen = tuple(layer.sigma_adapters["calibrated"].indices.tolist())
        assert cost[chosen] == pytest.approx(min(cost.values()), rel=1e-9)
        assert output_error(layer, x, "calibrated") == pytest.approx(cost[chosen], rel=1e-3, abs=1e-6)
        assert output_error(layer, x, "calibrated") <= output_error(layer, x, "plain") * (1 + 1e-4) + 1e-8
        differs += chosen != tuple(layer.sigma_adapters["plain"].indices.tolist())
    assert differs > 0, "the data changed no layer's choice: the test shows nothing"


def test_calibration_that_reaches_no_layer_or_a_merged_model_is_refused():
    model = get_sigma_model(tiny_llama(), FULL)
    with pytest.raises(ValueError, match="calibration data gave no batches"):
        model.compress(4, calibration=[])
    model.merge()
    with pytest.raises(ValueError, match="unmerge"):
        model.compress(4, calibration=calibration())


def test_the_command_calibrates_on_the_training_data_it_recorded(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "adapter"
    train(settings(workspace, out, steps=5))
    assert main(["compress", str(out), str(tmp_path / "small"), "--rank", "4", "--calibrate", "16"]) == 0
    printed = capsys.readouterr().out
    assert (
        "calibrating on 16 training examples of" in printed and "on the calibration data at rank 4" in printed
    )
    summary = json.loads((tmp_path / "small" / SUMMARY_NAME).read_text())
    assert summary["compressed_from"]["calibration"] == {
        "data": str(workspace / "parity.jsonl"),
        "examples": 16,
    }
    assert all(len(layer.indices) == 4 for layer in read_adapter(tmp_path / "small").layers.values())
    assert main(["compress", str(out), str(tmp_path / "plain"), "--rank", "4", "--calibrate", "0"]) == 0
    assert "of the update's ‖ΔW‖_F at rank 4" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "plain" / SUMMARY_NAME).read_text())["compressed_from"]["calibration"] is None
    )


def test_the_command_calibrates_on_given_data_and_refuses_a_bad_count(tmp_path, capsys):
    folder = save_tiny_chat_model(tmp_path / "model", ["a b c d e f g", "one two three"])
    (tmp_path / "data.jsonl").write_text(
        "\n".join(json.dumps({"input": "a b", "output": "c d"}) for _ in range(40))
    )
    model = get_sigma_model(load_model(str(folder))[0], FULL)
    randomize(model, scale=0.1)
    model.save_pretrained(tmp_path / "full")
    common = [str(tmp_path / "full"), "--rank", "4", "--model", str(folder)]
    assert main(["compress", common[0], str(tmp_path / "bare"), *common[1:]]) == 0
    assert "no training data recorded with the adapter" in capsys.readouterr().out
    data = ["--data", str(tmp_path / "data.jsonl")]
    assert main(["compress", common[0], str(tmp_path / "small"), *common[1:], *data]) == 0
    assert "calibrating on" in capsys.readouterr().out
    assert main(["compress", common[0], str(tmp_path / "bad"), *common[1:], "--calibrate", "-1"]) == 1
    assert "--calibrate must be a whole number" in capsys.readouterr().err


def test_a_calibrated_band_keeps_everything_at_full_rank_and_serves_its_choice():
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=8, structure="band", band=2, svd="exact"))
    randomize(model, scale=0.2)
    before = logits(model)
    report = model.compress(8, "default", "all", calibration=calibration())
    assert report.calibrated and report.total == pytest.approx(1.0)
    model.set_adapter("all")
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-6)
    model.set_adapter("default")
    report = model.compress(3, "default", "three", calibration=calibration())
    assert 0 < report.total < 1 and "on the calibration data at rank 3" in report.summary()
    assert all(len(layer.sigma_adapters["three"].indices) == 3 for layer in model.spectral_layers().values())


def test_a_calibrated_band_is_refitted_to_its_least_squares_best_on_the_data():
    """A kept row of a band takes the coefficients over its kept neighbours that minimise the layer's output
    error on the calibration data: never worse than truncating M (strictly better where z is correlated),
    and a minimum: the error's gradient in the compressed band vanishes there, unlike at the truncation."""
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=8, structure="band", band=1, svd="exact"))
    randomize(model, scale=0.3)
    batches = calibration()
    inputs = layer_inputs(model, batches)
    model.compress(3, "default", "refit", calibration=batches)
    model.compress(3, "default", "cut", calibration=batches)
    better = 0
    for name, layer in model.spectral_layers().items():
        x = inputs[name].float()
        own = layer.sigma_adapters["default"].indices.tolist()
        chosen = [own.index(i) for i in layer.sigma_adapters["cut"].indices.tolist()]
        with torch.no_grad():  # the truncation: M's entries among the kept directions, as they were
            default = layer.sigma_adapters["default"]
            layer.sigma_adapters["cut"].vector.copy_(
                default.structure.restrict(default.vector, torch.tensor(chosen))
            )
        refit, cut = output_error(layer, x, "refit"), output_error(layer, x, "cut")
        assert refit <= cut * (1 + 1e-5) + 1e-9
        better += refit < 0.99 * cut
        gradients = {}
        for adapter in ("refit", "cut"):
            with torch.no_grad():
                layer.set_adapter("default")
                target = layer(x)
            layer.set_adapter(adapter)
            vector = layer.sigma_adapters[adapter].vector.requires_grad_(True)
            vector.grad = None
            (layer(x) - target).double().square().sum().backward()
            gradients[adapter] = float(valid_part(vector.grad).norm())
        layer.set_adapter("default")
        assert gradients["refit"] <= 1e-3 * gradients["cut"] + 1e-7, name
    assert better > 0, "the refit improved no layer: the test shows nothing"
