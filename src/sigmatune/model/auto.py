"""Loading a saved adapter by its folder alone, as PEFT's AutoPeftModelForCausalLM does: the adapter
records the name of its base model (as whoever trained it gave it: "smollm2", a hub name or an absolute
path), which is loaded with transformers and checked against the adapter as SigmaModel.from_pretrained
checks any base. It lives beside SigmaModel; the base is found by hub/loading.py, which knows the default
model's alias.
"""

from __future__ import annotations

from pathlib import Path

from ..formats.adapter_file import read_adapter
from ..hub.loading import base_name, resolve_model
from .sigma_model import SigmaModel


class AutoSigmaModelForCausalLM:
    """`AutoSigmaModelForCausalLM.from_pretrained(adapter_dir)`: the recorded base model with the adapter."""

    @classmethod
    def from_pretrained(
        cls,
        adapter_dir: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        base_model: str | None = None,
        **kwargs,
    ) -> SigmaModel:
        """The adapter in adapter_dir on its base model: the one it records, or `base_model` (a path or
        hub name) in its place. Every other keyword goes to transformers' from_pretrained for the base
        (dtype, device_map, quantization_config, ...). The tokenizer loads from
        `model.base_model.config._name_or_path`."""
        record = read_adapter(adapter_dir)
        name = base_model or record.base_model_name_or_path
        if not name:
            raise ValueError(
                f"{adapter_dir}: the adapter records no base model; pass base_model='<path or hub name>'"
            )
        base = _load_base(name, adapter_dir, kwargs)
        return SigmaModel.from_pretrained(
            base, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable
        )


def _load_base(name: str, adapter_dir, kwargs: dict):
    from transformers import AutoModelForCausalLM

    fix = "pass base_model='<path or hub name>' to AutoSigmaModelForCausalLM.from_pretrained"
    path = resolve_model(name)
    if Path(path).is_absolute() and not Path(path).exists():
        raise ValueError(f"{adapter_dir}: its base model {name!r} is not there; {fix}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:  # not found, or not a model transformers knows
        raise ValueError(
            f"{adapter_dir}: its base model {name!r} could not be loaded ({err}); {fix}"
        ) from None
    model.sigmatune_base_name = base_name(name)  # an adapter saved from it records the same name
    return model
