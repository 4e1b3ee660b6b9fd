"""HF Trainer integration: a callback that writes a complete sigmatune adapter into each checkpoint.

Without it the Trainer still checkpoints the adapters (SigmaModel.state_dict() holds only the
vectors, so its model.safetensors is small and resume_from_checkpoint restores them); with it each
checkpoint folder is also loadable by SigmaModel.from_pretrained.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from ..model.sigma_model import SigmaModel


class SaveAdapterCallback(TrainerCallback):
    """Trainer(..., callbacks=[SaveAdapterCallback()]): checkpoint-N/ also holds the sigmatune adapter."""

    def on_save(self, args, state, control, model=None, **kwargs):
        sigma_model = _find_sigma_model(model)
        if sigma_model is not None and args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            sigma_model.save_pretrained(folder)
        return control


def _find_sigma_model(model) -> SigmaModel | None:
    """The SigmaModel inside DDP / torch.compile wrappers, if any."""
    for _ in range(4):
        if isinstance(model, SigmaModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return None
