"""SigmaModel.forward as the HF Trainer sees it, and the one argument it refuses.

The Trainer reads forward's signature twice: on the model, to keep the batch columns the model takes
(here: the base model's arguments), and on the class, to find the label arguments (here: `labels`).
TrainerForward answers both; a forward that a trainer installs over it (TRL's fused LM head) runs on the base
model (installed_forward). A mixed batch (`adapter_ids`) is the model's only while
adapters train together (together.py: a collator puts each row's adapter index in the batch, as the HF
Trainer passes it); otherwise an AdapterBank over it serves one (serving/bank.py), so the model refuses the
argument instead of ignoring it.
"""

from __future__ import annotations

import inspect
import types


class TrainerForward:
    """A descriptor: SigmaModel.forward on the class takes `labels`; on an instance it shows (and calls)
    the base model's forward."""

    def __get__(self, instance, owner):
        return _forward_with_labels if instance is None else _BaseForward(instance)


def _forward_with_labels(self, *args, labels=None, **kwargs):
    if labels is not None:
        kwargs["labels"] = labels
    return self.base_model(*args, **kwargs)


class _BaseForward:
    """SigmaModel's forward on an instance: calls the base model, shows the base forward's signature."""

    def __init__(self, owner):
        self._owner = owner

    def __call__(self, *args, **kwargs):
        together = getattr(self._owner, "training_together", None)
        if together is not None and kwargs.get("adapter_ids") is not None:
            together.rows(kwargs.pop("adapter_ids"))
        refuse_adapter_ids(kwargs)
        return self._owner.base_model(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._owner.base_model.forward)


def installed_forward(owner, value):
    """What a SigmaModel keeps when code sets `model.forward = value`.

    A replacement of the class's forward (functools.wraps(type(model).forward), maybe wrapped again) bound
    to the model, as TRL installs for its fused LM head, is written for a transformers model: it reaches for the backbone
    (`self.base_model`) and the output embeddings of `self`. SigmaModel's forward is its base model's, so
    such a replacement runs with the base model as `self` (the adapters live inside it); its fallback, the
    forward it replaced, still calls the base model through SigmaModel. Anything else is kept as given."""
    function = getattr(value, "__func__", None)
    if getattr(value, "__self__", None) is owner and _replaces_ours(function):
        return types.MethodType(function, owner.base_model)
    return value


def _replaces_ours(function) -> bool:
    """Whether a function wraps SigmaModel's forward, directly or through other wrappers (accelerate's
    autocast and fp32 ones wrap TRL's): its chain of __wrapped__ reaches it."""
    for _ in range(32):  # a chain, not a cycle
        function = getattr(function, "__wrapped__", None)
        if function is None or function is _forward_with_labels:
            return function is not None
    return False


def refuse_adapter_ids(kwargs: dict) -> None:
    """Drop adapter_ids=None; refuse any other value (a base model would silently ignore it)."""
    if kwargs.pop("adapter_ids", None) is not None:
        raise ValueError(
            "adapter_ids needs an AdapterBank: bank = sigmatune.AdapterBank(model) (or AdapterBank.over(base, "
            "config)), add adapters to it, then call bank(input_ids, adapter_ids=...) or bank.generate(...); "
            "to train several adapters on a mixed batch, call the model inside `with Together(model, names):`"
        )
