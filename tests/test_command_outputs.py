"""What the commands that write a folder (merge, compress, export) may write over: nothing the user did
not ask to replace. A folder that holds anything is refused before any work, with the fix named; an
output that is the input (or holds it) is refused; a new folder gets the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from sigmatune import SigmaConfig, get_sigma_model
from sigmatune.cli import main
from sigmatune.formats.adapter_file import WEIGHTS_NAME
from sigmatune.hub.loading import load_model
from tests.models import randomize, save_tiny_chat_model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("model") / "model", ["a b c d", "one two three"])


@pytest.fixture
def adapter(model_folder, tmp_path):
    model = get_sigma_model(load_model(str(model_folder))[0], SigmaConfig(rank="full"))
    randomize(model, scale=0.1)
    model.save_pretrained(tmp_path / "proj" / "my-adapter")
    (tmp_path / "proj" / "results.txt").write_text("x\n")
    return tmp_path / "proj" / "my-adapter"


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


COMMANDS = {
    "merge": lambda a, out, model: ["merge", str(a), str(out), "--model", str(model)],
    "compress": lambda a, out, model: ["compress", str(a), str(out), "--rank", "4", "--model", str(model)],
    "export": lambda a, out, model: ["export", str(a), str(out), "--model", str(model)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_folder_that_holds_files_is_refused_and_left_as_it_was(command, adapter, model_folder, capsys):
    project = adapter.parent
    before = snapshot(project)
    assert main(COMMANDS[command](adapter, project, model_folder)) == 1
    error = capsys.readouterr().err
    assert "is not empty" in error and str(project) in error and "Traceback" not in error
    assert snapshot(project) == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_output_that_is_the_input_is_refused(command, adapter, model_folder, capsys):
    before = snapshot(adapter)
    assert main(COMMANDS[command](adapter, adapter, model_folder)) == 1
    assert "is the adapter itself" in capsys.readouterr().err
    assert snapshot(adapter) == before


def test_merge_into_the_current_folder_is_a_clear_error(adapter, model_folder, capsys, monkeypatch):
    monkeypatch.chdir(adapter.parent)
    assert main(["merge", "my-adapter", ".", "--model", str(model_folder)]) == 1
    error = capsys.readouterr().err
    assert "is not empty" in error and "Traceback" not in error
    assert (adapter / WEIGHTS_NAME).exists() and (adapter.parent / "results.txt").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_new_or_empty_folder_is_filled_with_the_usual_permissions(command, adapter, model_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    umask = os.umask(0o022)
    os.umask(umask)
    for out in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        assert main(COMMANDS[command](adapter, out, model_folder)) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
        files = [p for p in out.rglob("*") if p.is_file()]
        assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "debris left beside the output"
