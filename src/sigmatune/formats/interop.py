"""Other formats: PEFT LoRA folders (written), eigentune 0.2.0 and 0.1.0 adapters (read).

PEFT LoRA: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight` (r × in) and `.lora_B.weight` (out × r), as PEFT's
save_pretrained writes them; lora_alpha = r, so PEFT's scaling is 1 and B A is exactly ΔW. Every
layer gets the same r (smaller ones padded with zero rows), which LoRA servers such as vLLM expect.

eigentune 0.2.0 (`save_adapter`): eigentune_config.json + adapter_model.safetensors with
`<module>.delta` per layer; W' = W + U_r diag(w) V_rᵀ with w = δ ("additive") or δ ⊙ σ ("relative").
eigentune 0.1.0 (the seed) has no adapter format: its trained vectors are `…<module>.delta_s` entries
of a state dict (as a Trainer or save_file writes it), top-r, additive, exact SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .files import AdapterFileError, atomic_save_tensors, atomic_write_json, load_tensors, read_json

EIGENTUNE_CONFIG = "eigentune_config.json"
EIGENTUNE_WEIGHTS = "adapter_model.safetensors"
SEED_SUFFIX = ".delta_s"
PEFT_PREFIX = "base_model.model."
EIGENTUNE_UPDATES = {"additive": "additive", "relative": "multiplicative"}  # its update names → ours


def write_peft_lora(
    directory: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    target_modules: list[str],
    base_model_name_or_path: str | None,
    fan_in_fan_out: bool = False,
) -> int:
    """Write a PEFT LoRA folder from module name → (A, B); returns the (uniform) rank r."""
    directory = Path(directory)
    r = max(a.shape[0] for a, _ in factors.values())
    tensors = {}
    for name, (a, b) in factors.items():
        pad = r - a.shape[0]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.nn.functional.pad(
            a, (0, 0, 0, pad)
        ).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad)).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,  # True for GPT-2 style Conv1D bases (PEFT's rule)
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    atomic_save_tensors(directory / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(directory / "adapter_config.json", config)
    return r


@dataclass
class ForeignAdapter:
    """An adapter of another package, in sigmatune's terms."""

    update: str  # the name of a sigmatune update rule (core/updates.py)
    layers: dict[str, tuple[list[int], torch.Tensor]]  # module name → (singular-value indices, vector)
    svd: str  # how to recompute the bases ("exact" reproduces the peers' default)
    signatures: dict[str, list[float]]  # eigentune's basis signatures (empty: none)
    source: str


def read_eigentune(path: str | Path, layer_sizes: dict[str, int]) -> ForeignAdapter:
    """An eigentune adapter from a 0.2.0 folder, or from a 0.1.0 state dict (a .safetensors file, or a
    folder holding model.safetensors / adapter_model.safetensors). layer_sizes: module → min(out, in)."""
    path = Path(path)
    if path.is_dir() and (path / EIGENTUNE_CONFIG).exists():
        return _read_v020(path, layer_sizes)
    files = (
        [path] if path.is_file() else [path / n for n in ("adapter_model.safetensors", "model.safetensors")]
    )
    for file in files:
        if file.exists():
            return _read_v010(file, layer_sizes)
    raise AdapterFileError(
        path, "holds no eigentune adapter", f"expected {EIGENTUNE_CONFIG} (0.2.0) or a state dict"
    )


def _read_v020(path: Path, layer_sizes: dict[str, int]) -> ForeignAdapter:
    header = read_json(path / EIGENTUNE_CONFIG)
    version = header.get("format_version")
    if not isinstance(version, int) or version != 1:
        raise AdapterFileError(
            path / EIGENTUNE_CONFIG, f"has eigentune format version {version!r}; this sigmatune reads 1"
        )
    config, meta = header.get("config"), header.get("layers")
    if not isinstance(config, dict) or not isinstance(meta, dict):
        raise AdapterFileError(path / EIGENTUNE_CONFIG, "lacks 'config' and 'layers'")
    if config.get("method", "diagonal") != "diagonal" and config.get("core_bandwidth") != 0:
        raise AdapterFileError(
            path,
            "is an eigentune spectral_core adapter (an r × r core)",
            "sigmatune trains diagonals: it cannot hold it",
        )
    tensors, _ = load_tensors(path / EIGENTUNE_WEIGHTS)
    layers = {}
    for name, facts in meta.items():
        vector = tensors.get(f"{name}.delta")
        if vector is None or vector.dim() != 1:
            raise AdapterFileError(path / EIGENTUNE_WEIGHTS, f"lacks a 1-D {name}.delta")
        _check_layer(path, name, layer_sizes)
        rank = (
            facts.get("r", config.get("rank", vector.numel())) if isinstance(facts, dict) else vector.numel()
        )
        indices = _eigentune_indices(layer_sizes[name], rank, config.get("selection", "principal"))
        if len(indices) != vector.numel():
            raise AdapterFileError(
                path / EIGENTUNE_WEIGHTS,
                f"{name}.delta has {vector.numel()} values for {len(indices)} directions",
            )
        layers[name] = (indices, vector.float())
    named = config.get("update", "additive")
    update = EIGENTUNE_UPDATES.get(named) if isinstance(named, str) else None
    if update is None:
        raise AdapterFileError(
            path / EIGENTUNE_CONFIG,
            f"has an eigentune update {named!r}; this sigmatune reads {list(EIGENTUNE_UPDATES)}",
        )
    signatures = {n: f["sig"] for n, f in meta.items() if isinstance(f, dict) and "sig" in f}
    return ForeignAdapter(
        update, layers, "exact", signatures, f"eigentune {header.get('eigentune_version', '0.2')}"
    )


def _read_v010(file: Path, layer_sizes: dict[str, int]) -> ForeignAdapter:
    tensors, _ = load_tensors(file)
    layers = {}
    for key, vector in tensors.items():
        if not key.endswith(SEED_SUFFIX):
            continue
        name = key.removesuffix(SEED_SUFFIX).removeprefix(PEFT_PREFIX)
        _check_layer(file, name, layer_sizes)
        layers[name] = (list(range(vector.numel())), vector.float())
    if not layers:
        raise AdapterFileError(file, f"holds no eigentune 0.1.0 vectors (keys ending in {SEED_SUFFIX})")
    return ForeignAdapter("additive", layers, "exact", {}, "eigentune 0.1.0")


def _check_layer(path: Path, name: str, layer_sizes: dict[str, int]) -> None:
    if name not in layer_sizes:
        raise AdapterFileError(
            path,
            f"adapts layer {name!r}, which this model does not have: it was trained on another base model",
        )


def _eigentune_indices(k: int, rank: int, selection: str) -> list[int]:
    """eigentune's select_indices: top-r, bottom-r, or "mixed" (half from each end)."""
    r = min(rank, k)
    if selection == "principal":
        return list(range(r))
    if selection == "minor":
        return list(range(k - r, k))
    head = (r + 1) // 2
    return list(range(head)) + list(range(k - (r - head), k))


def eigentune_signature(u: torch.Tensor, v: torch.Tensor, k: int = 4) -> torch.Tensor:
    """eigentune's basis_signature for the first k selected directions: U (out × r), V (in × r), with its
    sign rule (the largest entry of each right singular vector positive)."""
    u, v = u[:, :k].float().cpu(), v[:, :k].float().cpu()
    rows = v.abs().argmax(dim=0)
    sign = torch.sign(v[rows, torch.arange(v.shape[1])])
    sign[sign == 0] = 1
    generator = torch.Generator().manual_seed(0)
    probe_v = torch.randn(v.shape[0], generator=generator)
    probe_u = torch.randn(u.shape[0], generator=generator)
    return torch.cat([(v * sign).T @ probe_v, (u * sign).T @ probe_u])
