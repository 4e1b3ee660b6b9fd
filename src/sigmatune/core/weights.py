"""The base layers sigmatune wraps: which modules are linear, their dense weight (out, in), their bias.

A base layer stays a black box to the forward pass; only initialisation (the SVD), merging and
export look at its weight, always through the functions here, so that other layer kinds (e.g.
transposed Conv1D, quantized layers) are taught in one place.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)  # Conv1D (GPT-2 style) stores its weight as (in, out)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FINGERPRINT_CHUNK = 1 << 20  # elements hashed per step: int64 copies of 8 MiB, patterns of 16 MiB
_DEQUANTIZERS: dict[type, Callable[[nn.Module], torch.Tensor]] = {}
_PLAIN = (torch.Tensor, nn.Parameter)


def register_dequantizer(layer_type: type, dequantize: Callable[[nn.Module], torch.Tensor]) -> None:
    """Teach sigmatune a quantized linear layer type: dequantize(module) → its (out, in) float weight."""
    _DEQUANTIZERS[layer_type] = dequantize


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, Conv1D (and their quantized subclasses), or a registered / dequantizable linear type."""
    if isinstance(module, (*LINEAR_TYPES, *_DEQUANTIZERS)):
        return True
    return all(
        isinstance(getattr(module, a, None), int) for a in ("in_features", "out_features")
    ) and callable(getattr(module, "dequantize", None))


def is_quantized(module: nn.Module) -> bool:
    """True when the layer's weight is not a plain float tensor (torchao, bitsandbytes, …)."""
    if isinstance(module, tuple(_DEQUANTIZERS)) or not isinstance(module, LINEAR_TYPES):
        return True
    weight = module.weight
    return type(weight) not in _PLAIN or not weight.is_floating_point()


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of a plain (not quantized) layer: a view of its parameter, no copy."""
    if is_quantized(module):
        raise TypeError(
            f"this {type(module).__name__} is quantized ({_describe(module)}); its weight can only be read "
            "dequantized, or given as full_precision_state_dict={'<module>.weight': the full-precision weight}"
        )
    return _stored_weight(module)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of any supported layer: the parameter itself, or a dequantized copy
    (torchao tensor subclasses, bitsandbytes 4/8-bit, registered types, modules with dequantize())."""
    for layer_type, dequantize in _DEQUANTIZERS.items():
        if isinstance(module, layer_type):
            return dequantize(module)
    if not isinstance(module, LINEAR_TYPES) and callable(getattr(module, "dequantize", None)):
        return module.dequantize()
    if not is_quantized(module):
        return _stored_weight(module)
    weight = module.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        dense = _bitsandbytes(module)
    elif weight.is_quantized or (
        type(weight) not in _PLAIN and callable(getattr(weight, "dequantize", None))
    ):
        try:
            dense = weight.dequantize()  # torch's quantized tensors, torchao's tensor subclasses
        except (NotImplementedError, RuntimeError) as err:  # a layout without a dequantize kernel
            raise TypeError(
                f"sigmatune cannot dequantize this {type(module).__name__} ({_describe(module)}: {err}): "
                "pass full_precision_state_dict={'<module>.weight': the full-precision weight}, or use a "
                "layout that can dequantize, or sigmatune.register_dequantizer(layer_type, function)"
            ) from err
    else:
        raise TypeError(
            f"sigmatune cannot dequantize this {type(module).__name__} ({_describe(module)}): pass "
            "full_precision_state_dict={'<module>.weight': the full-precision weight}, or teach it the layer "
            "with sigmatune.register_dequantizer(layer_type, function)"
        )
    return dense.T if isinstance(module, Conv1D) else dense


def compute_dtype(module: nn.Module, fallback: torch.dtype | None = None) -> torch.dtype:
    """The float dtype the layer computes in (for the bases it gets): its weight's, else its declared
    compute dtype (bitsandbytes 4-bit), else its bias's, else fallback (the model's), else the default."""
    for dtype in (
        getattr(getattr(module, "weight", None), "dtype", None),
        getattr(module, "compute_dtype", None),
        getattr(getattr(module, "bias", None), "dtype", None),
        fallback,
    ):
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return torch.get_default_dtype()


def weight_device(module: nn.Module) -> torch.device:
    weight = getattr(module, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else next(module.parameters()).device


def _bitsandbytes(module: nn.Module) -> torch.Tensor:
    """Linear4bit: its blockwise dequantization. Linear8bitLt: int8 codes C with row scales s, W = C s/127
    (after the first forward bitsandbytes moves C and s from the weight into module.state)."""
    import bitsandbytes.functional as bnb

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return bnb.dequantize_4bit(weight.data, weight.quant_state).float()
    state = getattr(module, "state", None)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
    codes = weight.CB if getattr(weight, "CB", None) is not None else weight.data
    if scales is None:
        raise TypeError(f"this {type(module).__name__} holds no int8 scales (SCB): is it quantized yet?")
    return codes.float() * (scales.float()[:, None] / 127.0)


def _describe(module: nn.Module) -> str:
    weight = getattr(module, "weight", None)
    return (
        f"weight {type(weight).__name__} of {getattr(weight, 'dtype', '?')}"
        if weight is not None
        else "no weight"
    )


def _stored_weight(module: nn.Module) -> torch.Tensor:
    """The weight parameter as (out, in), whatever its dtype."""
    if not isinstance(module, LINEAR_TYPES):
        raise TypeError(
            f"sigmatune cannot read the weight of a {type(module).__name__}; supported layers: "
            f"{', '.join(t.__name__ for t in LINEAR_TYPES)}; for other (e.g. quantized) layers pass "
            "full_precision_state_dict={'<module>.weight': the full-precision weight}"
        )
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def as_dense(module: nn.Module, stored: torch.Tensor) -> torch.Tensor:
    """A weight as stored in the module's state dict, turned into the (out, in) layout."""
    return stored.T if isinstance(module, Conv1D) else stored


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer (quantized ones too: packed weights lie about shape)."""
    if not isinstance(module, Conv1D) and isinstance(getattr(module, "out_features", None), int):
        return module.out_features, module.in_features
    out_features, in_features = _stored_weight(module).shape
    return out_features, in_features


def bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def svd_source(name: str, layer: nn.Module, full_precision_state_dict: dict | None) -> torch.Tensor:
    """The (out, in) weight to take the SVD of: from the user's full-precision state dict, else the layer."""
    stored = None if full_precision_state_dict is None else full_precision_state_dict.get(f"{name}.weight")
    if stored is None:
        if full_precision_state_dict is not None:
            warnings.warn(
                f"{name}.weight is not in full_precision_state_dict; using the layer's own weight",
                stacklevel=4,
            )
        return dequantized_weight(layer)
    stored, shape = as_dense(layer, stored), linear_shape(layer)
    if tuple(stored.shape) != shape:
        raise ValueError(
            f"full_precision_state_dict[{name + '.weight'!r}] has shape {tuple(stored.shape)}, but the layer's "
            f"weight is {shape}: the state dict belongs to another model"
        )
    return stored.to(weight_device(layer))


@torch.no_grad()
def write_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite the layer's weight in place with an (out, in) tensor (cast to the weight's dtype)."""
    target = dense_weight(module)
    if target.shape != weight.shape:
        raise ValueError(f"new weight has shape {tuple(weight.shape)}, the layer's is {tuple(target.shape)}")
    target.copy_(weight)


@torch.no_grad()
def fingerprint(weight: torch.Tensor) -> str:
    """A content hash of a weight: its shape, dtype and raw bits, computed where the weight lives.

    The bits are read as integers and reduced, chunk j by chunk, to a plain sum and two sums
    weighted by fixed position patterns (the latter times 2j + 1, so chunks cannot trade places),
    in int64 arithmetic that wraps. Wrapping addition is associative, so CPU and GPU give the same
    result without copying the weight to the host.
    """
    flat = weight.detach().reshape(-1)
    bits = flat.view(_INT_OF_SIZE[flat.element_size()])
    patterns = _position_patterns(flat.device)  # (2, CHUNK)
    sums = torch.zeros(3, dtype=torch.int64, device=flat.device)
    for j, start in enumerate(range(0, bits.numel(), _FINGERPRINT_CHUNK)):
        chunk = bits[start : start + _FINGERPRINT_CHUNK].to(torch.int64)  # (C,)
        sums[0] += chunk.sum()
        sums[1:] += (patterns[:, : chunk.numel()] * chunk).sum(dim=1) * (2 * j + 1)
    text = f"{tuple(weight.shape)}|{weight.dtype}|{sums.tolist()}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=4)
def _position_patterns(device: torch.device) -> torch.Tensor:
    position = torch.arange(_FINGERPRINT_CHUNK, device=device)
    return torch.stack([position % 65521 + 1, (position % 8191 + 3) * (position % 127 + 5)])  # (2, CHUNK)
