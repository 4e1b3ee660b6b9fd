"""ScaleTables: rows handed out from 1 up (row 0 is the base model), doubled when full, freed rows zeroed
and reused, gathers and mixes equal to indexing the tables by hand."""

from __future__ import annotations

import pytest
import torch

from sigmatune.serving.tables import ScaleTables


def test_rows_grow_gather_and_mix():
    tables = ScaleTables({"a": 3, "b": 2}, "cpu", capacity=2)
    first, second = tables.take(), tables.take()  # the second does not fit: the tables double
    assert (first, second, tables.capacity) == (1, 2, 4)
    tables.write(first, {"a": torch.tensor([1.0, 2.0, 3.0])})  # no scales for b: zeros there
    tables.write([second], {"a": torch.ones(1, 3), "b": torch.full((1, 2), 4.0)})
    rows = tables.gather(torch.tensor([0, 2, 1]))
    torch.testing.assert_close(rows["a"], torch.tensor([[0.0, 0, 0], [1, 1, 1], [1, 2, 3]]))
    torch.testing.assert_close(rows["b"], torch.tensor([[0.0, 0], [4, 4], [0, 0]]))
    mix = tables.combine({first: 0.5, second: 2.0})
    torch.testing.assert_close(mix["a"], torch.tensor([2.5, 3.0, 3.5]))
    torch.testing.assert_close(mix["b"], torch.tensor([8.0, 8.0]))
    assert tables.memory_bytes() == 4 * (3 + 2) * 4


def test_a_freed_row_is_zeroed_and_reused():
    tables = ScaleTables({"a": 2}, "cpu")
    row = tables.take()
    tables.write(row, {"a": torch.tensor([5.0, 6.0])})
    tables.free(row)
    assert torch.equal(tables.read(row)["a"], torch.zeros(2))
    assert tables.take() == row


def test_scales_for_an_unknown_layer_are_refused():
    tables = ScaleTables({"a": 2}, "cpu")
    with pytest.raises(ValueError, match=r"layers these tables do not hold: \['z'\]"):
        tables.write(tables.take(), {"z": torch.zeros(2)})
