"""The commands of `sigmatune` (cli.py maps each name to one of these functions; `train` is
training/job.py's): evaluate a saved adapter, inspect it, merge it into a plain model, export it, compress it,
generate with it, and serve a folder of adapters over HTTP.

Each adapter command takes the adapter folder; the base model and data default to those recorded in
its training_summary.json (written by `sigmatune train`), else to the default model.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from .core.config import SigmaConfig
from .core.device import resolve_device
from .core.structures.registry import structure_of
from .core.updates import update_rule
from .formats.adapter_file import WEIGHTS_NAME, read_adapter, write_adapter
from .formats.files import atomic_write_json, check_output_folder, staged_folder
from .formats.model_card import write_model_card
from .hub.loading import DEFAULT_MODEL, load_model
from .model.exchange import record_of
from .model.sigma_model import SigmaModel
from .training.data import load_task
from .training.job import SUMMARY_NAME
from .training.scores import base_score, format_score, score
from .training.settings import TrainSettings
from .training.summary import read_summary, settings_of
from .training.tokens import example_batches, prompt_batch


def training_summary(adapter_dir: str | Path) -> dict:
    """The training_summary.json beside an adapter ({} when the adapter was saved another way), bounded
    and checked (training/summary.py): a bad one is an error naming the file and the field."""
    return read_summary(adapter_dir)


def recorded_settings(adapter_dir: str | Path) -> TrainSettings:
    """The TrainSettings the adapter was trained with (the defaults for what its summary does not record)."""
    return settings_of(Path(adapter_dir) / SUMMARY_NAME, training_summary(adapter_dir))


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
    """Held-out loss and exact match of the adapter (and of the base model alone: the score `train` kept in
    the cache folder when there is one, training/score_cache.py), on the training run's held-out split
    unless data/heldout say otherwise."""
    settings = recorded_settings(adapter_dir)
    overrides = dict(
        model=model, data=data, heldout=heldout, eval_accuracy=eval_accuracy, device=device, dtype=dtype
    )
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    sigma_model, tokenizer = load_adapted(adapter_dir, settings.model, settings.device, settings.dtype)
    task = load_task(settings.data, settings.heldout, settings.seed)
    chosen, torch_dtype = resolve_device(settings.device, settings.dtype)
    base = base_score(
        sigma_model, tokenizer, task, settings, chosen, torch_dtype, packed=False
    )  # kept: cached
    adapted = score(sigma_model, tokenizer, task, settings, chosen)
    print(f"base model: {format_score(base)}\nadapted:    {format_score(adapted)}")
    return {"base": dataclasses.asdict(base), "adapted": dataclasses.asdict(adapted), "data": settings.data}


def inspect_adapter(adapter_dir, plot: str | None = None) -> dict:
    """A per-layer summary of what the adapter learned; with plot, a PNG of the relative changes
    δ/σ per layer and of the base spectra σ at the trained directions (and, for a band, the size of
    M's diagonals by offset)."""
    record = read_adapter(adapter_dir)
    update = record.config.update
    rule = update_rule(update)
    kind = structure_of(record.config.structure, record.config.band)
    rows = []
    for name, layer in record.layers.items():
        scales = rule.scales(layer.vector, layer.sigma)  # g = δ/σ (r,), a band of M (2b+1, r), or M
        relative = kind.diagonal(scales)
        rows.append(
            {
                "layer": name,
                "shape": [layer.out_features, layer.in_features],
                "rank": len(layer.indices),
                "trained": int(layer.vector.numel()),
                "mean_abs_relative_change": float(relative.abs().mean()),
                "max_abs_relative_change": float(relative.abs().max()),
                "off_diagonal_share": float(
                    1 - relative.square().sum() / scales.square().sum().clamp(min=1e-30)
                ),
                "sigma_max": float(layer.sigma.max()),
            }
        )
    structure = record.config.structure + (f" b={record.config.band}" if record.config.band else "")
    print(
        f"{adapter_dir}: {len(rows)} layers, {sum(r['trained'] for r in rows):,} trained numbers, "
        f"update={update}, structure={structure}"
    )
    print(f"base model: {record.base_model_name_or_path}  fingerprint: {record.base_fingerprint}")
    print(f"{'layer':<48}{'r':>6}{'mean|δ/σ|':>12}{'max|δ/σ|':>12}{'off-diag':>10}")
    for row in rows:
        print(
            f"{row['layer'][-48:]:<48}{row['rank']:>6}{row['mean_abs_relative_change']:>12.4f}"
            f"{row['max_abs_relative_change']:>12.4f}{100 * row['off_diagonal_share']:>9.1f}%"
        )
    if plot:
        _plot(record, plot)
    return {"layers": rows, "config": record.config.to_dict()}


def merge_adapter(adapter_dir, output_dir, model: str | None = None, dtype: str = "float32") -> Path:
    """Write a plain HF model folder (weights merged, tokenizer included) that needs no sigmatune, into
    a new or empty folder (check_output_folder)."""
    check_output_folder(output_dir, adapter_dir)
    sigma_model, tokenizer = load_adapted(adapter_dir, model, "cpu", dtype)
    merged = sigma_model.merge_and_unload()
    output = Path(output_dir)
    with staged_folder(output) as staging:  # the folder appears whole
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"merged model written to {output}")
    return output


def export_adapter(adapter_dir, output_dir, format: str = "lora", model: str | None = None) -> Path:
    """Write the adapter in another format: "lora" = a PEFT LoRA folder (vLLM, LoRAX and PEFT serve it)."""
    if format != "lora":
        raise ValueError(
            f"unknown export format {format!r}; use 'lora' (or `sigmatune merge` for a merged model)"
        )
    check_output_folder(output_dir, adapter_dir)
    sigma_model, _ = load_adapted(adapter_dir, model, "cpu", "float32")
    with staged_folder(output_dir) as staging:
        rank = sigma_model.export_lora(staging)
    print(f"LoRA (r={rank}, lora_alpha={rank}) written to {output_dir}")
    return Path(output_dir)


def compress_adapter(
    adapter_dir, output_dir, rank: int, model: str | None = None, data: str | None = None, calibrate: int = 64
) -> Path:
    """Write the adapter kept to its `rank` largest directions per layer (model/compress.py) as an ordinary
    adapter in output_dir, with the training summary (marked compressed_from) so eval finds its data.
    The directions are weighed by their effect on `calibrate` training examples of `data` (default: the
    data the adapter was trained on, from its summary; its held-out split is never used); calibrate=0, or
    no data known, weighs them by the update alone."""
    if isinstance(calibrate, bool) or not isinstance(calibrate, int) or calibrate < 0:
        raise ValueError(f"--calibrate must be a whole number of examples (0 = none), got {calibrate!r}")
    check_output_folder(output_dir, adapter_dir)
    sigma_model, tokenizer = load_adapted(adapter_dir, model, "cpu", "float32")
    settings, summary = recorded_settings(adapter_dir), training_summary(adapter_dir)
    spec = data or summary.get("settings", {}).get("data")
    batches, examples = None, 0
    if spec and calibrate:
        task = load_task(spec, settings.heldout, settings.seed)
        batches = example_batches(tokenizer, task.instruction, task.train[:calibrate], settings.max_length)
        examples = len(batches)
        print(f"calibrating on {examples} training examples of {spec}")
    elif calibrate:
        print(
            "no training data recorded with the adapter: directions weighed by the update alone (--data FILE)"
        )
    report = sigma_model.compress(rank, "default", "compressed", calibration=batches)
    output = Path(output_dir)
    if summary:
        summary["compressed_from"] = {
            "adapter": str(adapter_dir),
            "rank": rank,
            "kept": round(report.total, 4),
            "calibration": {"data": spec, "examples": examples} if examples else None,
        }
    record = record_of(sigma_model, "compressed", save_bases=False)
    with staged_folder(output) as staging:  # adapter, summary and card appear together
        write_adapter(staging, record)
        if summary:
            atomic_write_json(staging / SUMMARY_NAME, summary)
        write_model_card(staging, record, summary or None, name=output.name)
    print(f"{report.summary()}\ncompressed adapter (rank {rank}) written to {output}")
    return output


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
        raise ImportError(
            "--plot needs matplotlib: pip install matplotlib (or, in the sigmatune clone, pip install -e '.[plot]')"
        ) from None
    kinds = sorted({name.rsplit(".", 1)[-1] for name in record.layers})
    color = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    band = record.config.band
    figure, axes = plt.subplots(1, 3 if band else 2, figsize=(21 if band else 14, 5))
    changes, spectra = axes[0], axes[1]
    rule = update_rule(record.config.update)
    structure = structure_of(record.config.structure, band)
    for name, layer in record.layers.items():
        kind = name.rsplit(".", 1)[-1]
        scales = rule.scales(layer.vector, layer.sigma)
        changes.plot(layer.indices, structure.diagonal(scales), color=color[kind], alpha=0.4, lw=0.8)
        spectra.semilogy(layer.indices, layer.sigma, color=color[kind], alpha=0.4, lw=0.8)
        if band:  # the band's size by offset: RMS of each diagonal of M
            offsets = list(range(-band, band + 1))
            axes[2].plot(offsets, scales.square().mean(dim=1).sqrt(), color=color[kind], alpha=0.4, lw=0.8)
    if band:
        axes[2].set(title="band of M: RMS of each diagonal", xlabel="offset j − i", ylabel="RMS of M[i, j]")
    for kind in kinds:
        changes.plot([], [], color=color[kind], label=kind)
    changes.set(title="learned relative change δ/σ per layer", xlabel="singular-value index", ylabel="δ / σ")
    spectra.set(title="base spectrum σ at the trained directions", xlabel="singular-value index", ylabel="σ")
    changes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot written to {path}")


# ---- serving ------------------------------------------------------------------------------------


def build_server(
    model: str,
    adapters: str | None,
    rank: int | None,
    device: str,
    dtype: str,
    max_batch: int | None,
    max_resident: int | None,
    temperature: float = 0.0,
):
    """(Server, Engine) over a base model and the adapter folders inside `adapters`: a bank whose bases
    hold every principal direction up to `rank` (for hot-loads) and every direction the folders select.
    A folder that cannot be served is skipped with a warning on stderr naming it and why."""
    Server = _serving().server.Server
    from .serving.bank import AdapterBank, bases_for
    from .serving.engine import Engine

    chosen, torch_dtype = resolve_device(device, dtype)
    base, tokenizer = load_model(model, torch_dtype, chosen)
    folders = sorted(p for p in Path(adapters).iterdir() if (p / WEIGHTS_NAME).is_file()) if adapters else []
    skipped: dict[Path, Exception] = {}
    indices = bases_for(folders, base, skipped)
    folders = [folder for folder in folders if folder not in skipped]
    sigma_model = SigmaModel(base)
    config = SigmaConfig(rank=rank or 16)
    plan = sigma_model.plan(config) if rank or not folders else {}
    for layer, chosen_indices in indices.items():
        plan[layer] = sorted(set(plan.get(layer, [])) | set(chosen_indices))
    sigma_model.ensure_bases(config, plan, pin=True)
    bank = AdapterBank(sigma_model, max_resident=max_resident)
    for folder in folders:
        try:
            bank.load(folder.name, folder)
        except (ValueError, KeyError, OSError) as err:  # e.g. the spectra of another base model
            skipped[folder] = err
    for folder, err in skipped.items():
        print(
            f"sigmatune serve: skipped the adapter folder {folder}: {err}\n  the server starts without it; "
            f'fix it, then POST /v1/adapters {{"name": "{folder.name}"}} loads it',
            file=sys.stderr,
            flush=True,
        )
    engine = Engine(bank, max_batch=max_batch).start()
    return Server(engine, tokenizer, adapters, temperature=temperature), engine


def serve(
    model: str = "smollm2",
    adapters: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    rank: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_batch: int | None = None,
    max_resident: int | None = None,
    temperature: float = 0.0,
) -> None:
    """Run the server until interrupted (uvicorn with its HTTP_SETTINGS: see serving/routes.http_server).
    The port is taken first (a port in use fails at once, before the model loads); the "serving" line
    comes once it is, with the port the socket got (--port 0: a free one)."""
    if not 0 <= temperature <= 2:
        raise ValueError(f"--temperature must be in [0, 2] (0: greedy), not {temperature}")
    routes = _serving().routes
    sock = routes.listening_socket(host, port)
    try:
        server, engine = build_server(
            model, adapters, rank, device, dtype, max_batch, max_resident, temperature
        )
        count, bound = len(server.bank.names()) - 1, sock.getsockname()[1]
        print(f"serving {model} with {count} adapters on http://{host}:{bound}/v1", flush=True)
        try:
            routes.http_server(routes.create_app(server)).run(sockets=[sock])
        finally:
            engine.stop()
    finally:
        sock.close()


def _serving():
    """The serving package (its routes and server modules), or an ImportError naming the [serve] extra."""
    try:
        from .serving import routes, server
    except ImportError as err:
        raise ImportError(
            f"serving needs fastapi and uvicorn: pip install fastapi uvicorn, or pip install -e '.[serve]' in "
            f"sigmatune's clone ({err})"
        ) from None
    return SimpleNamespace(routes=routes, server=server)
