"""What to do with a saved adapter: evaluate it, inspect it, merge it into a plain model, generate.

Each function takes the adapter folder; the base model and data default to those recorded in its
training_summary.json (written by `sigmatune train`), else to the default model.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from .adapter_file import read_adapter
from .data import DEFAULT_MODEL, load_model, load_task
from .files import read_json
from .model import SigmaModel
from .tokens import prompt_batch
from .train import SUMMARY_NAME, TrainSettings, format_score, resolve_device, score


def training_summary(adapter_dir: str | Path) -> dict:
    """The training_summary.json beside an adapter ({} when the adapter was saved another way)."""
    path = Path(adapter_dir) / SUMMARY_NAME
    return read_json(path) if path.exists() else {}


def load_adapted(adapter_dir, model: str | None = None, device: str = "auto", dtype: str = "auto"):
    """(SigmaModel for inference, tokenizer) for a saved adapter on its base model."""
    summary = training_summary(adapter_dir)
    name = model or summary.get("settings", {}).get("model", DEFAULT_MODEL)
    chosen, torch_dtype = resolve_device(device, dtype)
    base, tokenizer = load_model(name, torch_dtype, chosen)
    return SigmaModel.from_pretrained(base, adapter_dir), tokenizer


def evaluate_adapter(
    adapter_dir, model=None, data=None, heldout=None, eval_accuracy=None, device="auto", dtype="auto"
) -> dict:
    """Held-out loss and exact match of the adapter (and of the base model alone), on the training
    run's held-out split unless data/heldout say otherwise."""
    recorded = training_summary(adapter_dir).get("settings", {})
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    settings = TrainSettings(**{k: v for k, v in recorded.items() if k in known})
    overrides = dict(
        model=model, data=data, heldout=heldout, eval_accuracy=eval_accuracy, device=device, dtype=dtype
    )
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    sigma_model, tokenizer = load_adapted(adapter_dir, settings.model, settings.device, settings.dtype)
    task = load_task(settings.data, settings.heldout, settings.seed)
    chosen, _ = resolve_device(settings.device, settings.dtype)
    with sigma_model.disable_adapter():
        base = score(sigma_model, tokenizer, task, settings, chosen)
    adapted = score(sigma_model, tokenizer, task, settings, chosen)
    print(f"base model: {format_score(base)}\nadapted:    {format_score(adapted)}")
    return {"base": dataclasses.asdict(base), "adapted": dataclasses.asdict(adapted), "data": settings.data}


def inspect_adapter(adapter_dir, plot: str | None = None) -> dict:
    """A per-layer summary of what the adapter learned; with plot, a PNG of the relative changes
    δ/σ per layer and of the base spectra σ at the trained directions."""
    record = read_adapter(adapter_dir)
    update = record.config.update
    rows = []
    for name, layer in record.layers.items():
        relative = _relative(layer, update)
        rows.append(
            {
                "layer": name,
                "shape": [layer.out_features, layer.in_features],
                "rank": int(layer.vector.numel()),
                "mean_abs_relative_change": float(relative.abs().mean()),
                "max_abs_relative_change": float(relative.abs().max()),
                "sigma_max": float(layer.sigma.max()),
            }
        )
    print(
        f"{adapter_dir}: {len(rows)} layers, {sum(r['rank'] for r in rows):,} trained numbers, update={update}"
    )
    print(f"base model: {record.base_model_name_or_path}  fingerprint: {record.base_fingerprint}")
    print(f"{'layer':<48}{'r':>6}{'mean|δ/σ|':>12}{'max|δ/σ|':>12}")
    for row in rows:
        print(
            f"{row['layer'][-48:]:<48}{row['rank']:>6}"
            f"{row['mean_abs_relative_change']:>12.4f}{row['max_abs_relative_change']:>12.4f}"
        )
    if plot:
        _plot(record, plot)
    return {"layers": rows, "config": record.config.to_dict()}


def merge_adapter(adapter_dir, output_dir, model: str | None = None, dtype: str = "float32") -> Path:
    """Write a plain HF model folder (weights merged, tokenizer included) that needs no sigmatune."""
    sigma_model, tokenizer = load_adapted(adapter_dir, model, "cpu", dtype)
    merged = sigma_model.merge_and_unload()
    output = Path(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.replace(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"merged model written to {output}")
    return output


def export_adapter(adapter_dir, output_dir, format: str = "lora", model: str | None = None) -> Path:
    """Write the adapter in another format: "lora" = a PEFT LoRA folder (vLLM, LoRAX and PEFT serve it)."""
    if format != "lora":
        raise ValueError(
            f"unknown export format {format!r}; use 'lora' (or `sigmatune merge` for a merged model)"
        )
    sigma_model, _ = load_adapted(adapter_dir, model, "cpu", "float32")
    rank = sigma_model.export_lora(output_dir)
    print(f"LoRA (r={rank}, lora_alpha={rank}) written to {output_dir}")
    return Path(output_dir)


@torch.no_grad()
def generate(
    adapter_dir, prompt: str, model: str | None = None, max_new_tokens: int = 64, device="auto"
) -> str:
    """The adapted model's greedy answer to a prompt (chat-formatted with the task's instruction)."""
    sigma_model, tokenizer = load_adapted(adapter_dir, model, device)
    instruction = training_summary(adapter_dir).get("task", {}).get("instruction")
    chosen, _ = resolve_device(device, "auto")
    batch = {k: v.to(chosen) for k, v in prompt_batch(tokenizer, instruction, [prompt]).items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = sigma_model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(text)
    return text


def _plot(record, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'sigmatune[cli]' (or matplotlib)") from None
    kinds = sorted({name.rsplit(".", 1)[-1] for name in record.layers})
    color = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    figure, (changes, spectra) = plt.subplots(1, 2, figsize=(14, 5))
    for name, layer in record.layers.items():
        kind = name.rsplit(".", 1)[-1]
        changes.plot(
            layer.indices, _relative(layer, record.config.update), color=color[kind], alpha=0.4, lw=0.8
        )
        spectra.semilogy(layer.indices, layer.sigma, color=color[kind], alpha=0.4, lw=0.8)
    for kind in kinds:
        changes.plot([], [], color=color[kind], label=kind)
    changes.set(title="learned relative change δ/σ per layer", xlabel="singular-value index", ylabel="δ / σ")
    spectra.set(title="base spectrum σ at the trained directions", xlabel="singular-value index", ylabel="σ")
    changes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot written to {path}")


def _relative(layer, update: str) -> torch.Tensor:
    """δ/σ of each trained direction: g itself for multiplicative adapters."""
    return layer.vector if update == "multiplicative" else layer.vector / layer.sigma
