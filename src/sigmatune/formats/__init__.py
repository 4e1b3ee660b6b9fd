"""Bytes on disk: atomic writes and checked reads (files), sigmatune's adapter files (adapter_file), the
basis cache (basis_cache), whether a saved adapter fits a base model (base_check), PEFT LoRA and
eigentune files (interop), and training checkpoints (checkpoint). Built on core; knows no SigmaModel.
"""
