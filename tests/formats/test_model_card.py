"""The model card is written beside an adapter without ever hanging, reading without bound or failing
the save: whatever README.md is in the folder (a FIFO, a link to /dev/zero, a folder, a huge file), the
adapter is saved and a README.md that is not sigmatune's own card is left as it is."""

from __future__ import annotations

import os
import threading

import pytest

from sigmatune import SigmaConfig, SigmaModel, get_sigma_model
from sigmatune.formats.adapter_file import WEIGHTS_NAME
from sigmatune.formats.model_card import CARD_NAME, MARK
from tests.models import logits, randomize, tiny_llama


def saved_within(model, folder, seconds: float = 20.0) -> None:
    """save_pretrained in a thread that must end within `seconds` (a FIFO would block it forever)."""
    errors = []

    def save():
        try:
            model.save_pretrained(folder)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=save, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"save_pretrained did not return within {seconds} s"
    assert not errors, f"save_pretrained failed: {errors[0]!r}"


@pytest.fixture
def model():
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=4))
    randomize(model)
    return model


CARDS = {
    "fifo": lambda path: os.mkfifo(path),
    "link to /dev/zero": lambda path: path.symlink_to("/dev/zero"),
    "folder": lambda path: (path.mkdir(), (path / "inside.txt").write_text("mine")),
    "huge file": lambda path: path.write_bytes(b"x" * (64 * 2**20)),
    "dangling link": lambda path: path.symlink_to(path.parent / "nowhere"),
}


@pytest.mark.parametrize("kind", sorted(CARDS))
def test_any_readme_in_the_folder_leaves_the_save_whole(kind, model, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    CARDS[kind](folder / CARD_NAME)
    before = os.lstat(folder / CARD_NAME)
    saved_within(model, folder)
    assert (folder / WEIGHTS_NAME).exists()
    after = os.lstat(folder / CARD_NAME)
    assert (after.st_mode, after.st_ino, after.st_size) == (before.st_mode, before.st_ino, before.st_size)
    torch_close(logits(SigmaModel.from_pretrained(tiny_llama(), folder)), logits(model))


def test_our_own_card_is_rewritten_and_a_mark_far_down_is_not_ours(model, tmp_path):
    model.save_pretrained(tmp_path / "a")
    assert MARK in (tmp_path / "a" / CARD_NAME).read_text()
    (tmp_path / "a" / CARD_NAME).write_text(
        (tmp_path / "a" / CARD_NAME).read_text().replace("# a", "# edited")
    )
    model.save_pretrained(tmp_path / "a")
    assert "# edited" not in (tmp_path / "a" / CARD_NAME).read_text()
    (tmp_path / "b").mkdir()
    mine = "# my notes\n" + "text\n" * 5000 + MARK + "\n"
    (tmp_path / "b" / CARD_NAME).write_text(mine)
    model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / CARD_NAME).read_text() == mine


def torch_close(a, b) -> None:
    import torch

    torch.testing.assert_close(a, b)
