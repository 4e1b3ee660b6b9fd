"""SigmaModel.forward as the HF Trainer sees it, and the one argument it refuses.

The Trainer reads forward's signature twice: on the model, to keep the batch columns the model takes
(here: the base model's arguments), and on the class, to find the label arguments (here: `labels`).
TrainerForward answers both. A mixed batch (`adapter_ids`) is not the model's to serve: an AdapterBank
over it serves one (serving/bank.py), so the model refuses the argument instead of ignoring it.
"""

from __future__ import annotations

import inspect


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
        refuse_adapter_ids(kwargs)
        return self._owner.base_model(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._owner.base_model.forward)


def refuse_adapter_ids(kwargs: dict) -> None:
    """Drop adapter_ids=None; refuse any other value (a base model would silently ignore it)."""
    if kwargs.pop("adapter_ids", None) is not None:
        raise ValueError(
            "adapter_ids needs an AdapterBank: bank = sigmatune.AdapterBank(model) (or AdapterBank.over(base, "
            "config)), add adapters to it, then call bank(input_ids, adapter_ids=...) or bank.generate(...)"
        )
