"""The default model's GGUF conversion: gguf's reader shared while converting, as it was after."""

from __future__ import annotations

import pytest

from sigmatune.hub import gguf_models


def test_a_gguf_file_is_read_once_while_converting(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with gguf_models._gguf_read_once():
        first, second = gguf.GGUFReader(path), gguf.GGUFReader(path)
        assert first is second and first.tensors[0].name == "token_embd.weight"
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(
            gguf.MODEL_ARCH.LLAMA, 2
        )
    assert gguf.GGUFReader is original and gguf.GGUFReader(path) is not first  # as it was after the block
