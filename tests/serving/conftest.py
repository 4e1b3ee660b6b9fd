"""The HTTP server's tests need the [serve] extra (fastapi, uvicorn) and the test extra's clients (httpx, openai),
which the README's test command installs: where one is missing (a GPU machine with torch alone) their files are
left out of collection, not errors."""

from __future__ import annotations

import importlib.util

SERVER_FILES = [
    "test_adapter_lifecycle.py",
    "test_openai_fields.py",
    "test_serve.py",
    "test_serve_command.py",
    "test_serve_same_base.py",
    "test_server_hostile.py",
]
SERVE_EXTRA = all(
    importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn", "httpx", "openai")
)
collect_ignore = [] if SERVE_EXTRA else SERVER_FILES
