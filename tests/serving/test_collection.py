"""The server's test files are found by what they import (tests/serving/conftest.py leaves them out where the
[serve] extra is missing)."""

from __future__ import annotations

from tests.serving.conftest import SERVER_FILES, needs_the_server


def test_the_server_test_files_are_found_by_their_imports(tmp_path):
    assert {
        "test_serve.py",
        "test_server_hostile.py",
        "test_openai_fields.py",
        "test_serve_command.py",
    } <= set(SERVER_FILES)
    assert not {"test_bank.py", "test_engine.py", "test_collection.py"} & set(SERVER_FILES)
    cases = {
        "from sigmatune.serving.routes import http_server\n": True,
        "import httpx\n": True,
        "from fastapi.testclient import TestClient\n": True,
        "import torch\nfrom sigmatune.serving.engine import Engine\n": False,
        "def f():\n    import openai\n": False,  # imported where used: collecting the file needs no client
    }
    for number, (source, expected) in enumerate(cases.items()):
        path = tmp_path / f"test_{number}.py"
        path.write_text(source)
        assert needs_the_server(path) is expected, source
