"""Which layers of a model an adapter targets: by name, by regex, or every linear layer."""

from __future__ import annotations

import re

from torch import nn

from .config import name_matches
from .layer import SpectralLinear, unwrapped
from .weights import is_linear, linear_shape


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by its module name, in named_modules() order; a SpectralLinear counts as one and
    is not walked into (its adapters, thousands of modules in a model with many, are not layers)."""
    layers, seen = {}, set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:  # a module reached twice counts once, as in named_modules()
            return
        seen.add(id(module))
        if isinstance(module, SpectralLinear) or is_linear(module):
            layers[name] = module
        if isinstance(module, SpectralLinear):
            return
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return layers


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer by its module name (wrapped ones: their base's)."""
    return {name: linear_shape(unwrapped(layer)) for name, layer in linear_layers(model).items()}


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the linear layers that target_modules selects, in model order; errors name the fix.

    "all-linear" takes every linear layer but the output head (as PEFT does); a string is a regex
    that must match a whole module name; a list holds names, each matching a module whose name is
    that name or ends with '.' + that name.
    """
    layers = linear_layers(model)
    if target_modules == "all-linear":
        head = _output_head(model)
        names = [name for name, layer in layers.items() if unwrapped(layer) is not head]
    elif isinstance(target_modules, str):
        names = [name for name in layers if re.fullmatch(target_modules, name)]
    else:
        names = [name for name in layers if any(name_matches(name, key) for key in target_modules)]
        unmatched = [key for key in target_modules if not any(name_matches(name, key) for name in layers)]
        if unmatched:
            raise ValueError(_unknown_message(model, unmatched, layers))
    if not names:
        raise ValueError(_unknown_message(model, [target_modules], layers))
    return names


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return unwrapped(head) if head is not None else None


def _unknown_message(model: nn.Module, keys: list, layers: dict[str, nn.Module]) -> str:
    available = sorted({name.rsplit(".", 1)[-1] for name in layers})
    non_linear = sorted(
        {
            name
            for name, _ in model.named_modules()
            for key in keys
            if isinstance(key, str) and name_matches(name, key)
        }
        - set(layers)
    )
    message = f"target_modules {keys if len(keys) > 1 else keys[0]!r} matched no linear layer of the model"
    if non_linear:
        message += f" (it names {non_linear[:3]}, which {'is' if len(non_linear) == 1 else 'are'} not linear)"
    return message + f"; linear layers available: {available}, or use 'all-linear'"
