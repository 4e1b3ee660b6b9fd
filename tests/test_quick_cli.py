"""`sigmatune --help` is quick: parsing the command line imports neither torch nor transformers (they come
with the command that runs); the public API is imported name by name on first use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sigmatune

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "eval", "inspect", "merge", "export", "compress", "generate", "serve"]

CHILD = textwrap.dedent(
    """
    import contextlib, io, sys
    from sigmatune.cli import main

    for argv in ([], *[[command] for command in sys.argv[1:]]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*argv, "--help"])
        assert "usage: sigmatune" in out.getvalue(), argv
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        main(["train", "--lr", "fast"])  # a bad option is refused before anything heavy loads
    print(sorted(m for m in ("torch", "transformers", "numpy", "safetensors") if m in sys.modules))
    """
)


def test_help_and_bad_options_import_nothing_heavy():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *COMMANDS], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_every_train_option_has_its_fields_comment_as_help():
    """`train --help` takes each option's help from its TrainSettings field's inline comment: a field whose line
    the formatter wrapped (the comment then on another line) would be listed with none."""
    import argparse
    import dataclasses

    from sigmatune import cli
    from sigmatune.training.settings import TrainSettings

    parser = argparse.ArgumentParser()
    cli._train_arguments(parser)
    helps = {action.dest: action.help for action in parser._actions if action.dest != "help"}
    assert set(helps) == {field.name for field in dataclasses.fields(TrainSettings)}
    bare = [name for name, text in helps.items() if not text.replace("(default: %(default)s)", "").strip()]
    assert not bare, f"options without help: {bare}"


def test_the_public_api_resolves_each_name():
    assert set(sigmatune.__all__) == {*sigmatune._EXPORTS, "__version__"}
    for name in sigmatune.__all__:
        assert getattr(sigmatune, name) is not None and name in dir(sigmatune)
    from sigmatune import SigmaModel, get_sigma_model

    assert SigmaModel.__module__ == "sigmatune.model.sigma_model" and callable(get_sigma_model)
    with pytest.raises(AttributeError, match="no attribute 'SigmaModle'"):
        sigmatune.SigmaModle  # noqa: B018


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`sigmatune inspect ADAPTER | head`: the reader leaves, the command ends with 0 and says nothing."""
    from sigmatune import SigmaConfig, get_sigma_model
    from tests.models import tiny_llama

    get_sigma_model(tiny_llama(num_hidden_layers=150), SigmaConfig(rank=2)).save_pretrained(tmp_path / "a")
    child = subprocess.Popen(
        [sys.executable, "-m", "sigmatune", "inspect", str(tmp_path / "a")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert child.stdout.readline().startswith(
        str(tmp_path / "a").encode()
    )  # 1,050 rows: more than a pipe holds
    child.stdout.close()
    assert child.wait(timeout=120) == 0
    assert child.stderr.read() == b""
